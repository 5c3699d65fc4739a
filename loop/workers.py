"""Ray worker groups: a pool of rollout actors that together act as one `Student`, and training as a
Ray task that asks for a GPU when the cluster has one. The driver stays a single controller; the
same code runs on a laptop's local Ray and on a cluster (`ray_address`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Token auth is Ray's default for a cluster it starts; stating it before Ray reads its config keeps
# it and spares every run Ray's warning that the mode was chosen for us. RAY_AUTH_MODE set in the
# environment (e.g. "disabled" to join a cluster without auth) wins.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402

from loop.train import PROBE_FILE, PROBE_TEXTS, LoraSettings, TrainResult, train_adapter  # noqa: E402
from policies.student import Generation, Message, operating_point  # noqa: E402

PROBE_TOLERANCE = 0.05  # mean log-prob per token; a stale adapter is off by far more


class AdapterSwapError(RuntimeError):
    pass


def check_probe(path: str | Path, got: list[float], where: str) -> None:
    """Raise unless `got` (probe log-probs computed after loading `path`) matches the trainer's."""
    expected = json.loads((Path(path) / PROBE_FILE).read_text())["logprobs"]
    if max(abs(a - b) for a, b in zip(got, expected)) > PROBE_TOLERANCE:
        raise AdapterSwapError(f"adapter {path} is not live on {where}: probe {got} != trainer's {expected}")


@dataclass(frozen=True)
class StudentOptions:
    """What `HFStudent` takes, as plain values that travel to the actors."""

    load_in_4bit: bool = False
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    thought_samples: int = 0
    json_mode: bool = False
    comparisons_first: bool = False


def start_ray(address: str = "") -> None:
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)


def _threads(threads: int, workers: int = 1) -> int:
    """Torch threads per process: `threads`, or 0 = the machine's cores shared among `workers`."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


@ray.remote(num_cpus=0)  # rollouts and training take turns, so an idle actor must not hold a core
class RolloutWorker:
    def __init__(self, model_dir: str, options: StudentOptions, threads: int):
        from policies.hf import HFStudent

        self._use_threads(threads)
        self.student = HFStudent(Path(model_dir), load_in_4bit=options.load_in_4bit, batch_size=options.batch_size,
                                 max_new_tokens=options.max_new_tokens, temperature=options.temperature, seed=options.seed,
                                 thought_samples=options.thought_samples, json_mode=options.json_mode,
                                 comparisons_first=options.comparisons_first)

    @staticmethod
    def _use_threads(threads: int) -> None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # Ray sets OMP threads to 1 for a 0-CPU actor

    def call(self, method: str, prompts: list[list[Message]], threads: int) -> list:
        """`method` of the student (act, generate_with_info, escalation_probabilities,
        without_escalating) with `threads` torch threads."""
        self._use_threads(threads)
        return getattr(self.student, method)(prompts)

    def load_adapter(self, path: str | None) -> list[float]:
        self.student.load_adapter(path)
        return self.student.probe_logprobs(list(PROBE_TEXTS))


class RayStudentPool:
    """A `Student` made of `n` rollout actors: each `act` call is split across them. `threads` per
    actor; 0 shares the machine's cores among the actors a call uses (two actors of one thread each
    generate 1.1-1.3x as fast as one of two threads on 2 cores: the Python between the matrix
    products overlaps; a call with one prompt gets one actor with every core)."""

    def __init__(self, model_dir: Path, options: StudentOptions, *, n: int = 1, threads: int = 0):
        self._args, self._n, self._fixed = (str(model_dir), options, _threads(threads, n)), n, threads
        self._workers: list = []
        self._start_workers()

    def _start_workers(self) -> None:
        gpu = 1 if ray.cluster_resources().get("GPU", 0) >= self._n else 0
        self._workers = [RolloutWorker.options(num_gpus=gpu).remote(*self._args) for _ in range(self._n)]
        self.adapter_id: str | None = None  # fresh actors hold the base model
        self._live: tuple[str | None, float | None] = (None, None)  # (adapter, its τ) the actors hold

    def _get(self, futures: list) -> list:
        """ray.get; an actor that died (OOM-killed, say) is replaced by fresh ones on the base model,
        and this call fails: the unit is retried, and its load_adapter swaps and verifies again."""
        try:
            return ray.get(futures)
        except ray.exceptions.RayActorError:
            self.shutdown()
            self._start_workers()
            raise

    def act(self, prompts: list[list[Message]]) -> list[str]:
        return [g.text for g in self.generate_with_info(prompts)]

    def generate_with_info(self, prompts: list[list[Message]]) -> list[Generation]:
        """Each completion with the adapter that wrote it and its token counts (split across the actors)."""
        return self._split("generate_with_info", prompts)

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float | None]:
        """p(escalate) at each prompt's state, without τ (split across the actors)."""
        return self._split("escalation_probabilities", prompts)

    def without_escalating(self, prompts: list[list[Message]]) -> list[Generation]:
        """Each step with `escalate` barred, p(escalate) still read (split across the actors)."""
        return self._split("without_escalating", prompts)

    def _split(self, method: str, prompts: list[list[Message]]) -> list:
        """One actor method over the prompts, split across the actors, answers in order."""
        if not prompts:
            return []
        size = -(-len(prompts) // len(self._workers))
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        threads = _threads(self._fixed, len(chunks))
        futures = [w.call.remote(method, chunk, threads) for w, chunk in zip(self._workers, chunks)]
        return [answer for chunk in self._get(futures) for answer in chunk]

    def load_adapter(self, path: str | Path | None) -> None:
        """Swap every actor to the adapter at `path` (None: the base) and its operating point τ, and
        verify the swap took: each actor's probe log-probs must match what the trainer saved."""
        live = (Path(path).name, operating_point(path)) if path else (None, None)
        if live == self._live:
            return  # already live on every worker (verified when it was loaded); workers start on the base
        values = self._get([w.load_adapter.remote(str(path) if path else None) for w in self._workers])
        if path is not None:
            for got in values:
                check_probe(path, got, "a rollout worker")
        self.adapter_id, self._live = live[0], live

    def shutdown(self) -> None:
        for w in self._workers:
            ray.kill(w)
        self._workers = []


def train_on_ray(model_dir: Path, conversations: list[Any], out_dir: Path, settings: LoraSettings, *, threads: int = 0) -> TrainResult:
    """`train_adapter` as a Ray task, on a GPU when the cluster has one."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @ray.remote(num_cpus=1, num_gpus=gpus)
    def _train(model_dir: str, conversations: list[Any], out_dir: str, settings: LoraSettings, threads: int) -> TrainResult:
        import torch

        torch.set_num_threads(threads)
        return train_adapter(Path(model_dir), conversations, Path(out_dir), settings, progress=True)

    return ray.get(_train.remote(str(model_dir), conversations, str(out_dir), settings, _threads(threads)))
