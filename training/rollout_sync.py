"""Turn-synchronised generation across training processes.

A multi-turn rollout asks the model for one reply per episode *still running on
this process*, so without care the processes of a multi-GPU run ask for
different numbers of replies, and some stop asking before others.  Every
generation backend TRL offers needs the opposite:

* vLLM server mode gathers the prompts of all processes, generates once, and
  hands process ``k`` the slice ``[k * n, (k + 1) * n)`` where ``n`` is its own
  count: with unequal counts a process gets another's completions;
* ZeRO-3 and FSDP generation gather the sharded weights collectively, so a
  process that stops calling leaves the others waiting for ever.

:class:`RankSynchronisedGenerator` wraps one turn's generator: before each call
the processes exchange how many prompts they hold, every process pads its list
to the largest count with an *inert prompt* (a copy of its own first prompt of
the rollout, whose reply is thrown away), and a process whose episodes are all
done keeps answering the others' calls (:meth:`drain`) until every process is
done.  So every process takes part in exactly the same sequence of equal-size
calls.  The completions that come back are checked against the prompts sent
(:func:`check_echoed_prompts`) where the backend echoes them.
"""
from __future__ import annotations

from typing import Callable, Sequence

# (sequences, images) -> (completion ids per sequence, their log-probs or None)
TurnGenerator = Callable[[list, list], tuple]
# count on this process -> the counts of all processes, in process order
CountExchange = Callable[[int], list]


class RolloutDesync(RuntimeError):
    """The processes' generation calls no longer line up (a backend or TRL change)."""


def accelerate_exchange(n: int) -> list:
    """All processes' counts through accelerate (``[n]`` with one process)."""
    from accelerate.utils import gather_object

    return [int(c) for c in gather_object([int(n)])]


class RankSynchronisedGenerator:
    """``generator`` called in lockstep by every process, with equal-size prompt lists.

    ``rounds`` holds, per call this process took part in, (its own prompts, the call's width):
    the padding it added is the difference.
    """

    def __init__(self, generator: TurnGenerator, exchange: CountExchange = accelerate_exchange):
        self.generator, self.exchange = generator, exchange
        self.inert: tuple | None = None  # (sequence, images) of this process's first prompt
        self.rounds: list[tuple[int, int]] = []

    def _call(self, sequences: list, images: list, width: int) -> tuple:
        if self.inert is None:
            raise RolloutDesync("another process asked for a generation before this one had any prompt")
        pad = width - len(sequences)
        out, logprobs = self.generator(sequences + [list(self.inert[0])] * pad, images + [self.inert[1]] * pad)
        if len(out) != width or (logprobs is not None and len(logprobs) != width):
            raise RolloutDesync(f"the generator returned {len(out)} completions for {width} prompts")
        n = len(sequences)
        self.rounds.append((n, width))
        return list(out[:n]), (None if logprobs is None else list(logprobs[:n]))

    def __call__(self, sequences: list, images: list) -> tuple:
        if not sequences:
            raise ValueError("a turn with no prompts: call drain() when this process has no episode left")
        if self.inert is None:
            self.inert = (list(sequences[0]), images[0])
        width = max(self.exchange(len(sequences)))
        return self._call(list(sequences), list(images), width)

    def drain(self) -> int:
        """Answers the other processes' calls with inert prompts until none has an episode left;
        returns how many calls that took."""
        extra = 0
        while True:
            width = max(self.exchange(0))
            if width == 0:
                return extra
            self._call([], [], width)
            extra += 1


def strip_tokens(ids: Sequence[int], drop: int | None) -> list:
    return [int(t) for t in ids if drop is None or int(t) != drop]


def check_echoed_prompts(sent: Sequence[Sequence[int]], echoed: Sequence[Sequence[int]] | None,
                         image_token: int | None) -> None:
    """Raises :class:`RolloutDesync` unless the backend's echo of the prompts is the prompts sent
    (image placeholder tokens aside: a backend may expand them)."""
    if echoed is None:
        return
    if len(echoed) != len(sent):
        raise RolloutDesync(f"{len(echoed)} prompts came back for {len(sent)} sent")
    for k, (a, b) in enumerate(zip(sent, echoed)):
        if strip_tokens(a, image_token) != strip_tokens(b, image_token):
            raise RolloutDesync(f"the completion for prompt {k} of this process was generated for another prompt "
                                f"(another process's): the processes' generation calls are out of step")
