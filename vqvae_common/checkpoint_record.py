"""What every checkpoint of this project records beside its arrays, and the checks made when
one is read back, the same for both twins' formats and for converted checkpoints.

The record is a flat JSON-able dict {"framework": "torch" | "jax", "kind": "vqvae" | "prior",
"model_config": {...}, "step": int, "weights_only": bool}; a record without "kind" (written
before priors existed) is a VQ-VAE's. A weights-only checkpoint holds the model (weights,
BatchNorm statistics, code usage) but no optimizer state: it can be evaluated, never resumed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vqvae_common.config import ModelConfig, model_config
from vqvae_common.errors import UserError
from vqvae_common.prior import PriorConfig, prior_config

FRAMEWORK_NAMES = {"torch": "PyTorch", "jax": "Flax"}
KINDS = {"vqvae": ("a VQ-VAE", model_config), "prior": ("a PixelCNN prior", prior_config)}


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    framework: str
    model_config: ModelConfig | PriorConfig
    step: int
    weights_only: bool = False
    kind: str = "vqvae"

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "kind": self.kind,
                "model_config": dataclasses.asdict(self.model_config),
                "step": self.step, "weights_only": self.weights_only}

    def check_config(self, config: ModelConfig | PriorConfig, path: str) -> None:
        """Refuse a checkpoint of another model config (trained with other flags)."""
        if self.model_config != config:
            raise UserError(f"{path} holds a model with config "
                            f"{dataclasses.asdict(self.model_config)}, "
                            f"not {dataclasses.asdict(config)}")

    def check_resumable(self, path: str) -> None:
        if self.weights_only:
            raise UserError(f"{path} holds weights only (a converted checkpoint): it can be "
                            f"evaluated but not resumed")


def read_record(raw: Any, path: str, framework: str, holds_optimizer: bool,
                kind: str = "vqvae") -> CheckpointRecord:
    """The record of the checkpoint at `path`, refused unless it is `framework`'s and holds
    a model of `kind`.

    The one weights-only rule: the record says so, or the checkpoint holds no optimizer state
    (`holds_optimizer`); files written before the record had the flag rely on the latter."""
    declared = raw.get("framework") if isinstance(raw, dict) else None
    if declared == framework and {"model_config", "step"} <= raw.keys():
        held = raw.get("kind", "vqvae")
        if held != kind:
            raise UserError(f"{path} holds {KINDS.get(held, ('an unknown model',))[0]}, not "
                            f"{KINDS[kind][0]}")
        return CheckpointRecord(framework, KINDS[kind][1](raw["model_config"]),
                                int(raw["step"]),
                                bool(raw.get("weights_only")) or not holds_optimizer, kind)
    found = declared if declared in FRAMEWORK_NAMES and declared != framework else "foreign"
    raise UserError(f"{path} is a {found} checkpoint, not a {FRAMEWORK_NAMES[framework]} "
                    f"checkpoint of this project; convert it first (python convert.py)")
