"""The RL reward of the contract (``reward_rl``): a format term and a quality term per episode.

``score = format_weight * format + quality_weight * quality`` with, by default
(the released recipe), ``0.2 * format + 0.8 * quality``:

* **format**: 1.0 when the episode made at least one ``add_bbox``/``add_point``
  call AND its last call is ``stop_action``; 0.5 when only one of the two
  holds; 0 otherwise (an unparseable reply is no call: it breaks "last call is
  stop").
* **quality** = ``clamp01(base - drop - cost + bonus)`` where, with IoU/Dice
  of the masks after each box/click (``IoU_1 .. IoU_n``).  No mask at all is
  scored as the empty mask (as the released recipe does): IoU = Dice = 0
  against a target, 1 against an empty reference (nothing there, and the
  policy drew nothing):

  - ``base = 0.5 * IoU_n + 0.5 * Dice_n`` (``IoU_n`` alone when ``Dice_n`` is 0);
  - ``drop = drop_penalty * (max_t IoU_t - IoU_n)``, only when n > 1;
  - ``cost = mask_cost * n``, only when n > 1 (the "turn cost");
  - ``bonus = gain_bonus * sum_{t>=2} max(0, IoU_t - IoU_{t-1})``: every
    refinement that raised IoU.  (Our reading of ``sum_t``: gains between
    consecutive masks; the first mask is scored by ``base``, not again here.)

Each term can be switched off for ablations (``use_*``).  IoU and Dice are
fractions in [0, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from MedSAMAgentLib.trajectory import Trajectory

MASK_ACTIONS = ("add_bbox", "add_point")


@dataclass(frozen=True)
class RewardSettings:
    format_weight: float = 0.2
    quality_weight: float = 0.8
    drop_penalty: float = 1.0
    mask_cost: float = 0.01
    gain_bonus: float = 0.1
    use_format: bool = True
    use_drop_penalty: bool = True
    use_mask_cost: bool = True
    use_gain_bonus: bool = True

    @classmethod
    def from_dict(cls, data: dict | None) -> "RewardSettings":
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown reward setting(s): {', '.join(sorted(unknown))}. "
                             f"Known: {', '.join(cls.__dataclass_fields__)}.")
        for name, value in data.items():
            kind = type(getattr(cls, name))  # every field has a default: a number or true/false
            if kind is bool and not isinstance(value, bool) or kind is float and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"reward {name} is {value!r}, but must be {'true or false' if kind is bool else 'a number'}.")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewardTerms:
    """One episode's reward and its parts (all logged)."""

    format: float
    quality: float
    score: float
    base: float = 0.0
    drop: float = 0.0
    cost: float = 0.0
    bonus: float = 0.0
    ious: list = field(default_factory=list)  # IoU after each mask, in order
    final_iou: float = 0.0
    final_dice: float = 0.0
    num_masks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def format_score(calls: list) -> float:
    """``calls``: the tool-call names of the episode in order (None for a reply that did not parse)."""
    has_mask_call = any(c in MASK_ACTIONS for c in calls)
    ends_with_stop = bool(calls) and calls[-1] == "stop_action"
    return 1.0 if has_mask_call and ends_with_stop else 0.5 if (has_mask_call or ends_with_stop) else 0.0


def episode_reward(calls: list, ious: list, dices: list, settings: RewardSettings = RewardSettings(),
                   reference_empty: bool = False) -> RewardTerms:
    """Reward of one episode from its call names and the IoU/Dice after each mask-producing call;
    ``reference_empty``: the slice has no target (only matters when no mask was made)."""
    if len(ious) != len(dices):
        raise ValueError(f"{len(ious)} IoU values but {len(dices)} Dice values")
    fmt = format_score(calls) if settings.use_format else 0.0
    n = len(ious)
    nothing = 1.0 if reference_empty else 0.0  # the empty mask against the reference
    final_iou = float(ious[-1]) if n else nothing
    final_dice = float(dices[-1]) if n else nothing
    base = 0.5 * final_iou + 0.5 * final_dice if final_dice > 0 else final_iou
    drop = settings.drop_penalty * (max(ious) - final_iou) if n > 1 and settings.use_drop_penalty else 0.0
    cost = settings.mask_cost * n if n > 1 and settings.use_mask_cost else 0.0
    gains = sum(max(0.0, float(b) - float(a)) for a, b in zip(ious[:-1], ious[1:]))
    bonus = settings.gain_bonus * gains if settings.use_gain_bonus else 0.0
    quality = min(1.0, max(0.0, base - drop - cost + bonus))
    score = settings.format_weight * fmt + settings.quality_weight * quality
    return RewardTerms(fmt, quality, score, base, drop, cost, bonus, [float(v) for v in ious], final_iou,
                       final_dice, n)


def trajectory_reward(trajectory: Trajectory, settings: RewardSettings = RewardSettings(),
                      reference_empty: bool = False) -> RewardTerms:
    """Reward of a finished engine trajectory (its steps must carry IoU/Dice: run with a reference;
    ``reference_empty``: that reference has no target pixel)."""
    calls = [s.action["name"] if s.action else None for s in trajectory.steps]
    masked = [s for s in trajectory.steps if s.mask is not None]
    if any(s.iou is None for s in masked):
        raise ValueError(f"episode {trajectory.episode_id} has no reference scores; RL needs reference masks")
    return episode_reward(calls, [s.iou for s in masked], [s.dice for s in masked], settings, reference_empty)
