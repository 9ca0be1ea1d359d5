"""The multi-turn RL environment: the engine's own agent loop, with a policy that samples.

An episode is exactly what inference runs (:class:`MedSAMAgentLib.agent.Agent`):
the first user turn shows the image and names the target, each reply is parsed,
the tool applies it, the new overlay comes back as the next user turn, up to
``max_turns`` or ``stop_action``.  Only the policy differs: :class:`RolloutPolicy`
asks a *generator* (the trainer's model or vLLM) for sampled replies and keeps
the token sequence of every episode:

* before each turn it renders the conversation with the profile's
  :meth:`~MedSAMAgentLib.profile.Profile.build_messages` and the processor's chat
  template -- the same two calls the inference policy makes -- and appends only
  the new environment tokens (the end of the last reply's turn and the new user
  turn with its image) to the sequence; the sampled reply tokens are kept as
  sampled, never re-tokenized;
* ``env_mask`` marks the sampled tokens (1) and environment tokens (0): only the
  former carry loss;
* ``turn_starts`` records where each generation began, so a test can compare
  every prefix with the inference prompt token for token.

The environment never retries a first-turn stop (the released inference does,
once): RL should learn not to stop before acting, and the format reward says so.
One tool instance serves every episode of a batch (on the GPU when the tool is).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from MedSAMAgentLib.actions import parse_action
from MedSAMAgentLib.agent import Agent, Episode
from MedSAMAgentLib.policies.base import Decision, Observation
from MedSAMAgentLib.profile import Profile
from MedSAMAgentLib.trajectory import Trajectory

from .reward import RewardSettings, RewardTerms, trajectory_reward
from .sampling import suppressed_tokens

# generator(sequences, images) -> (new token ids per sequence, their log-probs or None)
Generator = Callable[[list, list], tuple]


class TemplateMismatch(RuntimeError):
    """The chat template re-renders earlier turns differently once a new turn is added."""


@dataclass
class Rollout:
    """One episode's tokens: ``ids = prompt + completion``; ``env_mask``/``logprobs`` cover the completion."""

    episode_id: str
    ids: list = field(default_factory=list)
    prompt_length: int = 0
    env_mask: list = field(default_factory=list)  # per completion token: 1 sampled, 0 environment
    logprobs: list = field(default_factory=list)  # per completion token (0.0 for environment tokens)
    images: list = field(default_factory=list)  # PIL images in the sequence, in order
    turn_starts: list = field(default_factory=list)  # len(ids) before each generation
    replies: list = field(default_factory=list)
    noncanonical: int = 0  # sampled replies whose re-tokenized text differs from the sampled tokens
    truncated: bool = False  # a reply hit the token limit before <|im_end|>

    @property
    def prompt_ids(self) -> list:
        return self.ids[:self.prompt_length]

    @property
    def completion_ids(self) -> list:
        return self.ids[self.prompt_length:]


@dataclass
class EpisodeResult:
    rollout: Rollout
    trajectory: Trajectory
    reward: RewardTerms


class ChatRenderer:
    """Token ids of a conversation, exactly as the inference policy builds them."""

    def __init__(self, processor, profile: Profile):
        self.processor, self.profile = processor, profile
        self.tokenizer = processor.tokenizer
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def ids(self, target: str, images: Sequence, replies: Sequence[str], generation_prompt: bool) -> list:
        messages = self.profile.build_messages(target, list(images), list(replies))
        out = self.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                                 return_dict=True)
        ids = out["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def environment_tokens(self, target: str, images: Sequence, replies: Sequence[str]) -> list:
        """The tokens after the last reply's text up to the next generation: ``<|im_end|>\\n`` is
        not included (the sampled reply ends with ``<|im_end|>``); the rest of the template's
        turn end, the new user turn and the assistant header are."""
        before = self.ids(target, images[:-1], replies, generation_prompt=False)
        full = self.ids(target, images, replies, generation_prompt=True)
        ends = [i for i, t in enumerate(before) if t == self.end_id]
        if not ends:
            raise TemplateMismatch("the chat template does not end an assistant turn with <|im_end|>")
        cut = ends[-1] + 1
        if full[:cut] != before[:cut]:
            raise TemplateMismatch("adding a turn changes how earlier turns are tokenized; the RL sequence "
                                   "would differ from what the policy sees at inference")
        return full[cut:]


class RolloutPolicy:
    """A :class:`~MedSAMAgentLib.policies.base.Policy` that samples through ``generator`` and records tokens."""

    name = "rollout"

    def __init__(self, renderer: ChatRenderer, generator: Generator):
        self.renderer, self.generator = renderer, generator
        self.rollouts: dict[str, Rollout] = {}

    def act(self, observations: Sequence[Observation]) -> list[Decision]:
        tok = self.renderer.tokenizer
        sequences, image_lists = [], []
        for obs in observations:
            images = [Image.fromarray(np.asarray(im)) for im in obs.images]
            roll = self.rollouts.setdefault(obs.episode_id, Rollout(obs.episode_id))
            if obs.turn == 0:
                roll.ids = self.renderer.ids(obs.target, images, [], generation_prompt=True)
                roll.prompt_length = len(roll.ids)
            else:
                env = self.renderer.environment_tokens(obs.target, images, obs.replies)
                roll.ids += env
                roll.env_mask += [0] * len(env)
                roll.logprobs += [0.0] * len(env)
            roll.images = images
            roll.turn_starts.append(len(roll.ids))
            sequences.append(list(roll.ids))
            image_lists.append(images)
        new_ids, logprobs = self.generator(sequences, image_lists)
        decisions = []
        for i, (obs, ids) in enumerate(zip(observations, new_ids)):
            roll = self.rollouts[obs.episode_id]
            ids = [int(t) for t in ids]
            roll.ids += ids
            roll.env_mask += [1] * len(ids)
            roll.logprobs += list(logprobs[i]) if logprobs is not None else [0.0] * len(ids)
            text = tok.decode(ids, skip_special_tokens=True)
            roll.replies.append(text)
            ended = bool(ids) and ids[-1] == self.renderer.end_id
            if ended and tok.encode(tok.decode(ids[:-1]), add_special_tokens=False) != ids[:-1]:
                roll.noncanonical += 1
            if not ended:  # cut off at the token limit: the next turn could not be rendered as inference would
                roll.truncated = True
                decisions.append(Decision(text, parse_action("")))
            else:
                decisions.append(Decision(text, parse_action(text)))
        return decisions


class SegmentationEnvironment:
    """Runs batches of episodes with a generator and scores them with the reward."""

    def __init__(self, tool, processor, profile: Profile, reward: RewardSettings = RewardSettings(),
                 max_turns: int | None = None):
        self.tool = tool
        self.profile = dataclasses.replace(profile, first_turn_stop_retries=0)
        self.renderer = ChatRenderer(processor, self.profile)
        self.reward = reward
        self.max_turns = int(max_turns or profile.max_turns)

    def run(self, episodes: Sequence[Episode], generator: Generator) -> list[EpisodeResult]:
        """Play every episode to its end (ids of ``episodes`` must be unique); results in input order."""
        policy = RolloutPolicy(self.renderer, generator)
        trajectories = Agent(policy, self.tool, self.profile, max_turns=self.max_turns).run(episodes)
        empty = {e.id: e.reference is not None and not np.asarray(e.reference).any() for e in episodes}
        return [EpisodeResult(policy.rollouts[t.episode_id], t, trajectory_reward(t, self.reward, empty[t.episode_id]))
                for t in trajectories]


def suppressed_token_ids(tokenizer) -> list:
    """Vision and chat-structure tokens a policy must never emit (as at inference), by id."""
    return [i for _, i in suppressed_tokens(tokenizer)]


class ModelGenerator:
    """Samples replies from a transformers model directly (tests, evaluation, a single process)."""

    def __init__(self, model, processor, max_new_tokens: int = 128, temperature: float = 1.0, greedy: bool = False):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature, self.greedy = max_new_tokens, temperature, greedy
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.suppress = suppressed_token_ids(tok)

    def __call__(self, sequences: list, images: list) -> tuple:
        import torch

        longest = max(len(s) for s in sequences)
        ids = torch.tensor([[self.pad_id] * (longest - len(s)) + s for s in sequences])
        attention = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in sequences])
        inputs = self.processor.image_processor(images=[im for group in images for im in group], return_tensors="pt")
        image_pad = self.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        mm = (ids == image_pad).long()
        device = self.model.device
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=attention.to(device), mm_token_type_ids=mm.to(device),
                pixel_values=inputs["pixel_values"].to(device), image_grid_thw=inputs["image_grid_thw"].to(device),
                max_new_tokens=self.max_new_tokens, do_sample=not self.greedy,
                temperature=None if self.greedy else self.temperature, top_p=None, top_k=None,
                suppress_tokens=self.suppress or None, pad_token_id=self.pad_id, eos_token_id=self.end_id)
        new = out[:, longest:].tolist()
        cut = []
        for row in new:
            end = row.index(self.end_id) + 1 if self.end_id in row else len(row)
            cut.append(row[:end])
        return cut, None
