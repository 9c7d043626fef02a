"""`Workload`: what is run (train or infer, batch, lengths, dtype) and `Setting`: the global degrees.

Batch convention (Megatron/DeepSpeed): `global_batch` sequences per optimizer step (train) or in
flight (infer); `micro_batch` sequences per data-parallel rank per forward pass. Training runs
global_batch / (dp · micro_batch) micro-batches per step (gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds of the options (sequences or tokens, the simulator's candidates, a price, a run's
# tokens), shared by the command line and the sweep file read back
MAX_COUNT, MAX_SIMULATE_TOP, MAX_PRICE, MAX_TRAIN_TOKENS = 2**31, 1000, 1e4, 1e16
# a per-token latency target from a microsecond to a day (a smaller one underflowed to 0 s in
# milliseconds / 1000), a training run from a minute and a half (1e-3 days) to 270 years
SLO_MS_RANGE, DAYS_RANGE = (1e-3, 8.64e7), (1e-3, 1e5)


class Workload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["train", "infer"]
    global_batch: int = Field(gt=0)
    micro_batch: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    zero_stage: Literal[0, 1, 2] = 1
    prompt_len: int | None = Field(None, gt=0)
    gen_len: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "Workload":
        if self.mode == "infer":
            if self.prompt_len is None or self.gen_len is None:
                raise ValueError("infer workloads need prompt_len and gen_len")
            if self.prompt_len + self.gen_len != self.seq_len:
                raise ValueError("seq_len must equal prompt_len + gen_len for infer")
        if self.global_batch % self.micro_batch:
            raise ValueError("global_batch must be a multiple of micro_batch")
        return self


@dataclass(frozen=True, order=True)
class Setting:
    """One global choice: tensor-slicing, data-parallel degree, micro-batch, recomputation."""

    tp: int
    dp: int
    micro_batch: int
    recompute: bool

    def micro_steps(self, workload: Workload) -> int:
        return workload.global_batch // (self.dp * self.micro_batch)
