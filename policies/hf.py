"""The default student backend: transformers + PEFT, on CPU or GPU.

    student = HFStudent(resolve_model("smollm2-135m"))
    student.act([[{"role": "user", "content": "Where is my order?"}]])
    student.load_adapter("adapters/v3")   # a LoRA/QLoRA adapter saved by PEFT; None = back to the base

Prompts are rendered with the tokenizer's chat template and generated in left-padded batches
(KV cache on, as `generate` does by default). Greedy decoding when temperature is 0.

Prompts of one company share a long system message, so a batch's longest common token prefix is
run through the model once and its KV cache shared by every row (`prefix_cache`): on CPU prefill
is most of the cost. Each row is then `[prefix][left pads][suffix]`; `generate` skips the cached
prefix and numbers positions from the attention mask, so the suffix continues right after it.

**p(escalate)** at a decision state is the student's own probability of choosing `escalate` as its
next action: at the first token of the value of its step's `"action"` field (the step's first
field in the protocol's order, so it costs a few generated tokens), the probability of the token
that begins `escalate`, renormalised over the first tokens of the six action names.
`EscalationGate` reads it during generation, at no extra cost. An adapter may carry an **operating point** τ (`operating_point.json`, fitted by
loop/calibration.py): the student then escalates exactly when p(escalate) ≥ τ, and otherwise takes
its best other action, spelled as one of the protocol's names. The reason code is its own choice among the protocol's codes: the gate
allows only tokens that continue one of them (an escalation forced by τ against the student's
own preference would else name a reason that does not exist).

**Sampled thoughts** (`thought_samples` k > 0). A student that writes its rationale first has made
its decision by the action field, so p(escalate) read there is near 0 or 1, with nothing between for
τ to trade. This one writes the thought first (its prompts rewritten in THOUGHT_FIRST order, as it
was trained: `in_order`), samples k thoughts per state at `thought_temperature` up to the action
name (the k rows of a state in one batch, sharing its whole prompt's cache), and takes the mean of
their k p(escalate): its probability of escalating, over what it might think. The decision is that
mean ≥ τ; the thought that leans furthest toward it is continued, greedily, from its action name,
which the gate spells as decided (the continuation has `max_new_tokens` of its own). It costs k
thoughts' decoding per step (bench/thoughts.py measures what it buys).

**Comparisons first** (`comparisons_first`). An adapter trained to write a step thought first where
its rationale compares two numbers ("11 is within 12"), and action first everywhere else
(`protocol.comparisons_first`), reads its earlier steps so, and under json_mode decodes under a
grammar that admits either key order. Its first token chooses the order; on a step it thinks first,
the gate reads p(escalate) at the action name after the greedy thought, so τ applies there too.
Scoring alone (`escalation_probabilities`: fitting τ, choosing tickets) runs in two passes, so that
one row writing a thought does not hold its whole batch: `DECISION_TOKENS` for every row, then only
the rows that began a thought, together (bench/scoring.py measures it).

**json_mode** decodes every step under the protocol's JSON schema (`step_schema`, compiled once by
xgrammar): at each token only those that keep the text a prefix of a valid step are allowed, so the
step is one of the six actions with exactly its args, in the protocol's key order, its strings
bounded, and it ends where its object closes. What is left to the model is every choice inside
that shape; the gate above still decides the action name and the reason code's spelling. Like
sampled thoughts, it applies to an adapter: the base model, never taught the protocol, answers as
it always did (held to the grammar, its evaluation in the main command took over 4 times as long).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import xgrammar
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from environments.actions import ACTIONS, REASONS
from policies.protocol import ACTION_FIRST, THOUGHT_FIRST, comparisons_first, in_order, step_schema
from policies.student import Generation, Message, operating_point

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_CACHED_PREFIX = 32  # shorter shared prefixes are not worth an extra forward pass
DECISION_TOKENS = 8  # `{"action":"` is 3 tokens: a step written action first has its p(escalate) within these


class Decoded(NamedTuple):
    """What a row decoded: its new tokens, and how many came before its action name (None: it reached none)."""

    new_ids: list[int]
    decided_at: int | None


class Continue(NamedTuple):
    """A sampled thought to continue from its action name (`HFStudent._sampled`)."""

    p_escalate: float  # the mean over the prompt's k thoughts
    escalate: bool  # the decision the continuation must spell
    lead: int  # the prompt's last `lead` tokens are the step's own thought, which the completion continues


class HFStudent:
    """A `Student` on a Hugging Face causal LM, with at most one PEFT adapter live at a time."""

    def __init__(
        self,
        model_dir: Path,
        adapter: Path | None = None,
        load_in_4bit: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        seed: int = 0,
        json_mode: bool = False,
        prefix_cache: bool = True,
        use_threshold: bool = True,
        thought_samples: int = 0,
        thought_temperature: float = 1.0,
        comparisons_first: bool = False,
    ):
        """Load the base model from `model_dir` (see `policies.models.resolve_model`).

        load_in_4bit: NF4-quantize the base with bitsandbytes (QLoRA's base; also runs on CPU).
        dtype: "auto" is float32 on CPU and bfloat16 on CUDA; else one of `DTYPES`.
        device: "cuda" when available, else "cpu".
        temperature: 0 decodes greedily; above 0 samples, from a stream seeded once by `seed`.
        json_mode: with an adapter loaded, decode every step under the protocol's JSON schema (see
            the module docstring). Outputs are still validated.
        prefix_cache: prefill a batch's shared prompt prefix once, not once per row (same outputs).
        use_threshold: apply the loaded adapter's operating point τ (False: the raw greedy policy).
        thought_samples: 0 writes the action first. k > 0: an adapter (trained so) writes the thought
            first (prompts in THOUGHT_FIRST order) and decides on the mean p(escalate) over k thoughts
            sampled at `thought_temperature` (see "Sampled thoughts" in the module docstring); the base
            model, never taught to reason first, still answers as it always did.
        comparisons_first: under json_mode, an adapter may write a step thought first as well as action
            first (trained so: `protocol.comparisons_first`); p(escalate) is read at the action name
            wherever it comes, after a greedy thought on such a step.
        """
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {dtype!r}")
        if batch_size < 1 or max_new_tokens < 1 or temperature < 0 or thought_samples < 0 or thought_temperature <= 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1, temperature and thought_samples >= 0, thought_temperature > 0")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.json_mode = json_mode
        self.prefix_cache = prefix_cache
        self.use_threshold = use_threshold
        self.thought_samples, self.thought_temperature = thought_samples, thought_temperature
        self.comparisons_first = comparisons_first
        self.threshold: float | None = None  # the live adapter's τ, when applied

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        quantization = None
        if load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        # `model` is what generates: the base itself, or a PeftModel wrapping it.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, quantization_config=quantization, device_map={"": self.device}
        ).eval()
        # bitsandbytes 0.50 repacks 4-bit weights for its AVX512 CPU kernel on the first forward, and its
        # state_dict() (which PEFT calls to load an adapter) unpacks them wrongly (absmax layout), silently
        # corrupting the base. So on CPU every swap starts from a copy taken before any forward.
        self._untouched_base = copy.deepcopy(self.model) if load_in_4bit and self.device.type == "cpu" else None
        self.adapter_id: str | None = None
        self._grammars: dict[tuple, xgrammar.CompiledGrammar] = {}  # step_schema by key orders, on first json_mode use
        self._quotes: torch.Tensor | None = None  # which tokens hold a '"', on first json_mode use
        self._action_ids = action_first_token_ids(self.tokenizer)
        self._reason_ids = reason_token_ids(self.tokenizer)
        self._action_names = action_token_ids(self.tokenizer)
        torch.manual_seed(seed)
        if adapter is not None:
            self.load_adapter(adapter)

    # -- the Student protocol ------------------------------------------------------------------

    def act(self, prompts: list[list[Message]]) -> list[str]:
        return [generation.text for generation in self.generate_with_info(prompts)]

    def load_adapter(self, path: str | Path | None) -> None:
        """Make the adapter saved at `path` the only one live; None restores the base model.

        The previous adapter is removed first (`PeftModel.unload` puts the original base modules
        back; a 4-bit base on CPU is copied afresh, see `__init__`), so adapters never pile up in a
        long-running process and the base stays untouched.
        """
        if self._untouched_base is not None:
            base = copy.deepcopy(self._untouched_base)
        elif isinstance(self.model, PeftModel):
            base = self.model.unload()
        else:
            base = self.model
        self.model, self.adapter_id, self.threshold = base, None, None
        if path is not None:
            path = Path(path)
            self.model = PeftModel.from_pretrained(base, path, is_trainable=False).eval()
            self.adapter_id = path.name
            self.threshold = operating_point(path) if self.use_threshold else None

    # -- extras ----------------------------------------------------------------------------------

    def generate_with_info(self, prompts: list[list[Message]], *, stop_at_action: bool = False) -> list[Generation]:
        """Like `act`, with the adapter that answered, token counts and p(escalate) for each prompt."""
        if self.thought_samples and self.adapter_id is not None:  # the base model was never taught to reason first
            return self._sampled([self._render(in_order(m, THOUGHT_FIRST)) for m in prompts], stop_at_action)
        if self.comparisons_first and self.adapter_id is not None:  # its earlier steps as it was trained to read them
            prompts = [comparisons_first(m) for m in prompts]
            if stop_at_action and self.json_mode:
                return self._decided_then_thought([self._render(m) for m in prompts])
        return [g for g, _ in self._batched([self._render(m) for m in prompts], stop_at_action=stop_at_action)]

    def without_escalating(self, prompts: list[list[Message]]) -> list[Generation]:
        """Each prompt's step with `escalate` barred (the gate spells one of the other names) and
        p(escalate) still read: the path a student at any τ follows until its p reaches τ
        (loop/calibration.py fits τ on it)."""
        threshold, self.threshold = self.threshold, math.inf
        try:
            return self.generate_with_info(prompts)
        finally:
            self.threshold = threshold

    @property
    def name(self) -> str:
        """How reports name this student: `student`, or `student@τ=0.31` when τ decides."""
        return "student" if self.threshold is None else f"student@τ={self.threshold:.2g}"

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float | None]:
        """p(escalate) at each prompt's state, without τ: generation stops once every row has
        reached its action field (or its token budget)."""
        threshold, self.threshold = self.threshold, None
        try:
            return [g.p_escalate for g in self.generate_with_info(prompts, stop_at_action=True)]
        finally:
            self.threshold = threshold

    def count_tokens(self, messages: list[Message]) -> int:
        """Prompt length in tokens, as `act` would feed it (chat template + generation prompt)."""
        return len(self._render(messages))

    def probe_logprobs(self, texts: list[str]) -> list[float]:
        """Mean log-prob per token of each fixed text under the live model; a swap that took changes it."""
        return mean_logprobs(self.model, self.tokenizer, texts, self.device)

    # -- internals -------------------------------------------------------------------------------

    def _render(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)

    def _batched(self, prompt_ids: list[list[int]], *, stop_at_action: bool = False, temperature: float | None = None,
                 decisions: list[Continue] | None = None, budget: int | None = None) -> list[tuple[Generation, Decoded]]:
        """`_generate` over every prompt in chunks of `batch_size`, each with what it decoded."""
        # Sorting the token lists puts prompts with the same system message (the same company) in
        # the same chunks, so each chunk computes that long shared prefix once (see _generate).
        order = sorted(range(len(prompt_ids)), key=lambda i: prompt_ids[i])
        results: list = [None] * len(prompt_ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out = self._generate([prompt_ids[i] for i in chunk], stop_at_action, self.temperature if temperature is None else temperature,
                                 [decisions[i] for i in chunk] if decisions else None, budget)
            for i, result in zip(chunk, out):
                results[i] = result
        return results

    def _decided_then_thought(self, prompt_ids: list[list[int]]) -> list[Generation]:
        """p(escalate) of every prompt under comparisons first, in two passes. A batch stops only when
        its every row has reached its action name, so one row that thinks first would hold its whole
        batch for a thought's length. So every row first decodes `DECISION_TOKENS` (rows that write
        the action first decide there); only those that began a thought go on, batched together,
        with the whole budget. Each row decodes as it would in one pass."""
        first = self._batched(prompt_ids, stop_at_action=True, budget=DECISION_TOKENS)
        thinking = [i for i, (g, _) in enumerate(first) if g.p_escalate is None]
        if thinking:
            for i, result in zip(thinking, self._batched([prompt_ids[i] for i in thinking], stop_at_action=True)):
                first[i] = result
        return [g for g, _ in first]

    def _sampled(self, prompt_ids: list[list[int]], stop_at_action: bool) -> list[Generation]:
        """Sampled thoughts: k thoughts per prompt, sampled up to the action name; p(escalate) is the mean
        of theirs, and the decision is p ≥ τ (without τ, p ≥ 1/2). The step kept is the thought that
        leans furthest toward that decision, continued from its action name with the decision imposed."""
        k = self.thought_samples
        drafts = self._batched([ids for ids in prompt_ids for _ in range(k)], stop_at_action=True, temperature=self.thought_temperature)
        generations: list = [None] * len(prompt_ids)
        todo = []  # (index, prompt + its kept thought, Continue) of each step that goes on past its action name
        for i, ids in enumerate(prompt_ids):
            group = drafts[i * k : (i + 1) * k]
            reached = [(g.p_escalate, d) for g, d in group if g.p_escalate is not None]
            if not reached:  # no thought reached an action name within max_new_tokens: nothing to decide
                generations[i] = group[0][0]
                continue
            p = sum(q for q, _ in reached) / k  # a thought that never reached its action counts as not escalating
            escalate = p >= (self.threshold if self.threshold is not None else 0.5)
            _, draft = (max if escalate else min)(reached, key=lambda r: r[0])
            thought = draft.new_ids[: draft.decided_at]
            if stop_at_action:
                generations[i] = Generation(self.tokenizer.decode(thought, skip_special_tokens=True), self.adapter_id, len(ids), len(thought), p)
            else:
                todo.append((i, ids + thought, Continue(p, escalate, len(thought))))
        if todo:
            at, prompts, decisions = zip(*todo)
            for i, (g, _) in zip(at, self._batched(list(prompts), decisions=list(decisions))):
                generations[i] = g
        return generations

    @torch.inference_mode()
    def _generate(self, prompt_ids: list[list[int]], stop_at_action: bool = False, temperature: float = 0.0,
                  decisions: list[Continue] | None = None, budget: int | None = None) -> list[tuple[Generation, Decoded]]:
        """One left-padded batch, each row's completion with what it decoded. With `decisions`, every
        row continues a sampled thought from the first token of its action name (`_sampled`). `budget`:
        new tokens to stop after, if fewer than `max_new_tokens` (the grammar still closes steps by that)."""
        # os.path.commonprefix compares lists element-wise. Leave every row at least one token to
        # feed `generate`, which needs a new input token to produce the first logits.
        prefix_len = min(len(os.path.commonprefix(prompt_ids)), min(map(len, prompt_ids)) - 1)
        if not self.prefix_cache or prefix_len < MIN_CACHED_PREFIX:
            prefix_len = 0
        suffixes = [ids[prefix_len:] for ids in prompt_ids]
        padded = self.tokenizer.pad({"input_ids": suffixes}, return_tensors="pt").to(self.device)
        B = len(prompt_ids)
        prefix_1_P = torch.tensor([prompt_ids[0][:prefix_len]], dtype=torch.long, device=self.device)
        batch = {
            "input_ids": torch.cat([prefix_1_P.expand(B, -1), padded["input_ids"]], dim=1),
            "attention_mask": torch.cat([torch.ones_like(prefix_1_P).expand(B, -1), padded["attention_mask"]], dim=1),
        }
        if prefix_len:
            # The same live model (adapter included) that generates. `generate` sees a cache of length P,
            # runs only the input columns after it, and takes positions from the mask's cumsum, so pads
            # between prefix and suffix are skipped exactly as left padding is.
            cache = self.model(input_ids=prefix_1_P, use_cache=True, logits_to_keep=1).cache
            cache.batch_repeat_interleave(B)
            batch["cache"] = cache
        prompt_len = batch["input_ids"].shape[1]  # cached prefix included: generate returns whole rows
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        gate = EscalationGate(self.tokenizer, self._action_ids, prompt_len, self.threshold, B, self._reason_ids, self._action_names,
                              decisions=decisions)
        processors, stops = LogitsProcessorList([gate]), StoppingCriteriaList()
        schema = self.json_mode and self.adapter_id is not None  # the base model, never taught the protocol, answers as before
        if schema:
            # After the gate: the grammar narrows what the gate allows. A continued thought's object
            # opened in its prompt: its matcher first reads the step's tokens written so far.
            orders = ((THOUGHT_FIRST,) if self.thought_samples else
                      (ACTION_FIRST, THOUGHT_FIRST) if self.comparisons_first else (ACTION_FIRST,))
            leads = [ids[len(ids) - c.lead :] for ids, c in zip(prompt_ids, decisions)] if decisions else [[]] * B
            processors.append(StepGrammar(self._grammar(orders), prompt_len, leads, self.max_new_tokens, self._quote_ids()))
        if stop_at_action:
            stops.append(_StopAfterDecision(gate))
        out_B_T = self.model.generate(
            **batch,
            max_new_tokens=min(budget or self.max_new_tokens, self.max_new_tokens),
            pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=processors,
            stopping_criteria=stops,
            **sampling,
        )
        adapter_id = self.adapter_id
        end_ids = _end_token_ids(self.model.generation_config.eos_token_id) | {self.tokenizer.pad_token_id}
        generations = []
        for row, (ids, new_ids) in enumerate(zip(prompt_ids, out_B_T[:, prompt_len:].tolist())):
            # A finished row is filled with padding, which may be the same id as end-of-turn: count neither.
            new_ids = new_ids[: next((i for i, t in enumerate(new_ids) if t in end_ids), len(new_ids))]
            lead = decisions[row].lead if decisions else 0  # a continued step: its thought, at the prompt's end, is its own
            step_ids = ids[len(ids) - lead :] + new_ids
            text = self.tokenizer.decode(step_ids, skip_special_tokens=True)
            if schema:
                text = text[: json_object_end(text) or len(text)]
            generations.append((Generation(text, adapter_id, len(ids) - lead, len(step_ids), gate.p_escalate[row]),
                                Decoded(new_ids, gate.decided_at[row])))
        return generations

    def _quote_ids(self) -> torch.Tensor:
        if self._quotes is None:
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.model.config.vocab_size)))
            self._quotes = torch.tensor(['"' in (p or "") for p in pieces], device=self.device)
        return self._quotes

    def _grammar(self, orders: tuple[tuple[str, ...], ...]) -> xgrammar.CompiledGrammar:
        if orders not in self._grammars:
            # Compact separators: steps are written (and trained on) as pydantic serializes them.
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._grammars[orders] = xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(
                json.dumps(step_schema(*orders)), any_whitespace=False, separators=(",", ":"))
        return self._grammars[orders]


@torch.inference_mode()
def mean_logprobs(model, tokenizer, texts: list[str], device: torch.device | str) -> list[float]:
    """Mean log-prob of each text's tokens after the first, one forward pass per text.

    Shared by the student (after a swap) and anyone who must reproduce its numbers (the trainer).
    """
    means = []
    for text in texts:
        ids_T = tokenizer(text, return_tensors="pt")["input_ids"][0].to(device)
        if len(ids_T) < 2:
            raise ValueError(f"probe text {text!r} must be at least 2 tokens long")
        logits_TV = model(input_ids=ids_T[None]).logits[0, :-1].float()
        logprobs_T = torch.log_softmax(logits_TV, dim=-1).gather(-1, ids_T[1:, None])[:, 0]
        means.append(logprobs_T.mean().item())
    return means


def json_object_end(text: str) -> int | None:
    """Index just past the '}' that closes the JSON object opened by text[0], or None while it is open.

    Braces inside JSON strings (with backslash escapes) do not count.
    """
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _continuations(tokenizer, lead: str, words) -> list[list[int]]:
    """Each word's tokens as they follow `lead` in the model's output."""
    n = len(tokenizer.encode(lead, add_special_tokens=False))
    return [tokenizer.encode(lead + word, add_special_tokens=False)[n:] for word in words]


def action_first_token_ids(tokenizer) -> torch.Tensor:
    """The first token of each action name as it follows `"action":"` (in `ACTIONS` order)."""
    ids = [tokens[0] for tokens in action_token_ids(tokenizer)]
    if len(set(ids)) != len(ids):
        raise ValueError("this tokenizer does not start every action name with its own token; p(escalate) is undefined")
    return torch.tensor(ids)


ESCALATE = ACTIONS.index("escalate")
_ACTION_FIELD = ('"action":"', '"action": "')
_REASON_FIELD = ('"reason":"', '"reason": "')


def reason_token_ids(tokenizer) -> list[list[int]]:
    """Each reason code's tokens as they follow `"reason":"` (in `REASONS` order)."""
    return _continuations(tokenizer, '"reason":"', REASONS)


def action_token_ids(tokenizer) -> list[list[int]]:
    """Each action name's tokens as they follow `"action":"` (in `ACTIONS` order)."""
    return _continuations(tokenizer, '{"action":"', ACTIONS)


class EscalationGate(LogitsProcessor):
    """The escalation decision while the student decodes. At the first token of each row's action
    name: records p(escalate) (see the module docstring) and, with a threshold τ, lets the row spell
    only `escalate` when p ≥ τ and only one of the other action names otherwise. Without that, a
    student whose thought argued for escalating and whom τ holds back writes a name that does not
    exist. Inside a `"reason"` value: allows only tokens that continue one of the reason codes, so
    an escalation (τ's above all, which may overrule the student's own choice) names a reason the
    protocol knows."""

    def __init__(self, tokenizer, action_ids: torch.Tensor, prompt_len: int, threshold: float | None, rows: int,
                 reason_ids: list[list[int]] | None = None, action_names: list[list[int]] | None = None,
                 decisions: list[Continue] | None = None):
        """decisions: every row starts at its action name's first token, p(escalate) and the decision
        already made (`HFStudent._sampled`)."""
        self.tokenizer, self.action_ids, self.prompt_len, self.threshold = tokenizer, action_ids, prompt_len, threshold
        self.reason_ids = reason_ids if reason_ids is not None else reason_token_ids(tokenizer)
        self.action_names = action_names if action_names is not None else action_token_ids(tokenizer)
        self.p_escalate: list[float | None] = [None] * rows
        self.decided_at: list[int | None] = [None] * rows  # tokens generated before the row's action name
        # row -> (position where its open value began, the token sequences it may spell there)
        self.spelling: dict[int, tuple[int, list[list[int]]]] = {}
        for row, c in enumerate(decisions or []):
            self.p_escalate[row], self.decided_at[row] = c.p_escalate, 0
            self.spelling[row] = (prompt_len, self._names(c.escalate))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_len >= 2:
            tails = self.tokenizer.batch_decode(input_ids[:, -4:])  # `"reason": "` is 4 tokens
            for row, tail in enumerate(tails):
                if row not in self.spelling and tail.endswith(_REASON_FIELD):
                    self.spelling[row] = (input_ids.shape[1], self.reason_ids)
                if self.p_escalate[row] is None and tail.endswith(_ACTION_FIELD):
                    ids = self.action_ids.to(scores.device)
                    p = torch.softmax(scores[row, ids].float(), dim=-1)[ESCALATE].item()
                    self.p_escalate[row], self.decided_at[row] = p, input_ids.shape[1] - self.prompt_len
                    if self.threshold is not None:
                        self.spelling[row] = (input_ids.shape[1], self._names(p >= self.threshold))
        for row in list(self.spelling):
            start, words = self.spelling[row]
            self._spell(row, words, input_ids[row, start:].tolist(), scores)
        return scores

    def _names(self, escalate: bool) -> list[list[int]]:
        """The action names a row may spell: `escalate` alone, or every other one."""
        return [n for i, n in enumerate(self.action_names) if (i == ESCALATE) == escalate]

    def _spell(self, row: int, words: list[list[int]], written: list[int], scores: torch.FloatTensor) -> None:
        k = len(written)
        allowed = sorted({word[k] for word in words if len(word) > k and word[:k] == written})
        if not allowed:  # a whole word is written: the row goes on freely (closing quote)
            del self.spelling[row]
            return
        kept = scores[row, allowed].clone()
        scores[row] = float("-inf")
        scores[row, allowed] = kept

    @property
    def decided(self) -> bool:
        return all(p is not None for p in self.p_escalate)


class _StopAfterDecision(StoppingCriteria):
    """Stop once every row has reached its action field (`escalation_probabilities` needs no more)."""

    def __init__(self, gate: EscalationGate):
        self.gate = gate

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.gate.decided, device=input_ids.device)


class StepGrammar(LogitsProcessor):
    """Each row may write only tokens that keep its step a prefix of one the grammar accepts (then
    end-of-text). `leads`: tokens of each row's step already in its prompt (a continued thought).

    Strings are bounded in characters, but a run of digits is a token a character, so a step can
    still reach `budget` tokens inside a string. In its last `CLOSING` tokens a row therefore takes
    a token holding a '"' wherever the grammar and the gate allow one (closing the string it is in,
    or writing the next key), so it ends, closed, within the budget."""

    CLOSING = 20  # what is left after any string: `"},"thought":"","message":"x"}` and end-of-text

    def __init__(self, grammar: xgrammar.CompiledGrammar, prompt_len: int, leads: list[list[int]], budget: int,
                 quotes: torch.Tensor):
        self.prompt_len, self.budget, self.quotes = prompt_len, budget, quotes
        self.matchers = [xgrammar.GrammarMatcher(grammar) for _ in leads]
        self.live = [all(m.accept_token(t) for t in lead) for m, lead in zip(self.matchers, leads)]
        self.bitmask = xgrammar.allocate_token_bitmask(len(leads), grammar.tokenizer_info.vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        xgrammar.reset_token_bitmask(self.bitmask)  # all allowed: a finished or lost row is left alone
        for row, m in enumerate(self.matchers):
            if not self.live[row] or m.is_terminated():
                continue
            # A token outside the grammar (only if other processors left nothing it allows): the row
            # goes on unconstrained, and its step is recorded invalid, as written.
            if input_ids.shape[1] > self.prompt_len and not m.accept_token(int(input_ids[row, -1])):
                self.live[row] = False
            elif not m.is_terminated():
                m.fill_next_token_bitmask(self.bitmask, row)
        xgrammar.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        if input_ids.shape[1] - self.prompt_len >= self.budget - self.CLOSING:
            closing = (scores > float("-inf")) & self.quotes[: scores.shape[1]]
            rows = closing.any(dim=1) & torch.tensor(self.live, device=scores.device)
            scores[rows] = scores[rows].masked_fill(~closing[rows], float("-inf"))
        return scores


def _end_token_ids(eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
