"""Where a run's model runs: the whole model on this rank (alone or data-parallel), or one stage of a
module pipeline (``--pipeline-stages``), behind the runtime's runner interface."""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from mlaan_fast.runtime import make_step
from mlaan_fast.runtime.distributed import DistInfo
from mlaan_fast.runtime.pipeline import (
    Pipeline,
    balanced_partition,
    even_partition,
    make_groups,
    measure_module_costs,
)
from mlaan_fast.runtime.runner import ModelRunner, PipelineRunner


def check_ranks_agree(cfg, dinfo: DistInfo) -> None:
    """ValueError naming the ranks whose resolved config differs from rank 0's (before any work)."""
    if not dinfo.enabled:
        return
    mine = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "workers", "device")}
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
    everyone = [None] * dinfo.world
    dist.all_gather_object(everyone, digest)
    differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise ValueError(f"ranks {differ} were started with another configuration than rank 0 "
                         "(give every process the same flags)")


def pipeline_shape(cfg, dinfo: DistInfo, num_modules: int) -> tuple[int, int]:
    """(stage, replica) of this rank for ``cfg.pipeline_stages``; ValueError before any work if impossible."""
    P = cfg.pipeline_stages
    if dinfo.world < P:
        raise ValueError(f"pipeline_stages={P} needs {P} processes per replica, this run has {dinfo.world} "
                         f"(start it with torchrun --nproc_per_node={P} -m mlaan_fast train ...)")
    if dinfo.world % P:
        raise ValueError(f"pipeline_stages={P}: the {dinfo.world} processes do not divide into replicas of "
                         f"{P} stages (world size = stages x data-parallel replicas)")
    if P > num_modules:
        raise ValueError(f"pipeline_stages={P} for a model of {num_modules} modules; use at most "
                         f"{num_modules} (or a larger K)")
    return dinfo.rank % P, dinfo.rank // P


def _partition(cfg, model, dinfo: DistInfo, device, batch):
    """The stages' module ranges: from one profiled step on rank 0 (sent to all) or even."""
    if cfg.partition == "even":
        return even_partition(model.num_modules, cfg.pipeline_stages)
    costs = [None]
    if dinfo.rank == 0:
        images, targets = batch
        model.to(device)
        costs[0] = measure_module_costs(model, images.to(device), targets.to(device))
        model.to("cpu")
    dist.broadcast_object_list(costs, src=0)
    return balanced_partition(costs[0], cfg.pipeline_stages)


def build_runner(cfg, model, device: torch.device, dinfo: DistInfo, first_batch, template, say):
    """A ModelRunner (``model`` already on ``device``) or, with ``cfg.pipeline_stages`` > 1, a
    PipelineRunner for this rank's stage (``model``: the whole model on the CPU, restricted in place);
    ``first_batch`` is profiled for the partition, ``template()`` builds a whole CPU model for
    checkpoints (called on rank 0 only)."""
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    if cfg.pipeline_stages == 1:
        # Every batch's labels are checked on the host: the fused heads need not sync.
        step_fn = make_step(model, overlap=cfg.overlap, amp_dtype=amp, check_targets=False,
                            cuda_graphs=cfg.cuda_graphs, microbatches=cfg.microbatches)
        return ModelRunner(model, step_fn)
    stage, replica = pipeline_shape(cfg, dinfo, model.num_modules)
    partition = _partition(cfg, model, dinfo, device, first_batch)
    say(partition.describe(None if cfg.pipeline_mode == "async" else cfg.microbatches))
    groups = make_groups(cfg.pipeline_stages, dinfo.world // cfg.pipeline_stages, dinfo.rank)
    pipeline = Pipeline(model, partition, stage=stage, replica=replica, device=device, groups=groups,
                        mode=cfg.pipeline_mode, microbatches=cfg.microbatches, timeout_s=cfg.comm_timeout,
                        template=template)
    return PipelineRunner(pipeline, amp_dtype=amp)
