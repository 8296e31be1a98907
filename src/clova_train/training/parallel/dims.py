"""The layout of a run as data: data-parallel x pipeline x tensor-parallel degrees and the ZeRO stage, checked once, with the process groups.

Ranks are laid out as Megatron-LM and DeepSpeed's ``PipeModelDataParallelTopology``
lay them (axes pipe, data, model; the model axis fastest): the ranks of a
tensor-parallel group are consecutive, so they share a node; pipeline stages
are the slowest axis, so they span nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clova_train.core.errors import ClovaError
from clova_train.training.parallel.ds_config import ZERO_STAGES, ParallelConfig, zero_with_pipeline


@dataclass(frozen=True)
class ParallelDims:
    """How many ranks split the batch (dp), the layers (pp) and each layer (tp), and what ZeRO shards over dp."""

    dp: int
    """Data-parallel replicas: each reads its own share of every global batch."""
    pp: int = 1
    """Pipeline stages."""
    tp: int = 1
    """Tensor-parallel ranks splitting each block (consecutive ranks, inside one node)."""
    zero_stage: int = 3
    """ZeRO stage over the data-parallel ranks (0 or 1 under the pipeline engine)."""
    pipelined: bool = False
    """Run through DeepSpeed's pipeline engine (also with one stage: pipeline replicas)."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ClovaError(f"parallel degree {name} must be >= 1, not {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ClovaError(f"ZeRO stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.pipelined and self.zero_stage > 1:
            raise zero_with_pipeline(f"ZeRO-{self.zero_stage} with {self.pp} pipeline stages")
        if self.tp > 1:
            raise ClovaError(f"tensor parallelism ({self.tp} ranks per layer) is not available yet; use a tensor-parallel degree of 1")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world: int, zero_stage: int | None = None) -> "ParallelDims":
        """The layout ``--parallel`` and ``--pipeline-stages`` ask for on ``world`` ranks (refused in one line if they do not divide it)."""
        pp = parallel.stages(world)
        stage = ZERO_STAGES.get(parallel.mode, 1) if zero_stage is None else zero_stage
        dims = cls(dp=world // pp, pp=pp, zero_stage=stage, pipelined=parallel.mode == "pipeline")
        dims.check(world)
        return dims

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    def check(self, world: int) -> None:
        if self.world != world:
            raise ClovaError(f"layout {self.describe()} needs {self.world} ranks, not {world}")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipeline stage, data-parallel rank, tensor-parallel rank) of a global rank."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def data_rank(self, rank: int) -> int:
        """Which share of each global batch ``rank`` reads: every rank of one replica reads the same samples."""
        return self.coords(rank)[1]

    def group_ranks(self, axis: str) -> list[list[int]]:
        """The groups along ``axis`` ("dp", "pp" or "tp"): lists of global ranks that differ only in that coordinate."""
        index = {"pp": 0, "dp": 1, "tp": 2}[axis]
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = list(self.coords(rank))
            c[index] = -1
            groups.setdefault(tuple(c), []).append(rank)
        return list(groups.values())

    def new_groups(self) -> dict[str, object]:
        """This rank's process group along each axis (every rank calls this, in the same order, after init_process_group)."""
        import torch.distributed as dist

        rank, mine = dist.get_rank(), {}
        for axis in ("tp", "dp", "pp"):
            for ranks in self.group_ranks(axis):
                group = dist.new_group(ranks)  # collective: all ranks create every group
                if rank in ranks:
                    mine[axis] = group
        return mine

    def describe(self) -> str:
        zero = f"ZeRO-{self.zero_stage}"
        return f"dp {self.dp} x pp {self.pp} x tp {self.tp}, {zero}{', pipeline engine' if self.pipelined else ''}"

    def as_dict(self) -> dict:
        return asdict(self)
