"""`clova plan` and `clova train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from clova_train.cli.common import friendly, out
from clova_train.core.errors import ClovaError


def parse_rampup(text: Optional[str]) -> Optional[list[int]]:
    """--batch-rampup START,INCREMENT,TOKENS as three integers (TOKENS may be written 4e9)."""
    if text is None:
        return None
    try:
        values = [int(float(v)) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ClovaError(f"--batch-rampup {text!r}: expected START,INCREMENT,TOKENS, e.g. 32,32,4e9")
    return values


@friendly
def plan_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset: tiny, small, 137m, 350m, 760m, 1.3b, 6.9b, 13b, 39b, 82b (or --model-config / the shape flags)."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="JSON with model fields (a model section as in a run's config.json, or the run's config.json itself); over --model's preset.", rich_help_panel="Model"),
    n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Decoder blocks (a custom shape, over the preset or file).", rich_help_panel="Model"),
    n_embd: Optional[int] = typer.Option(None, "--n-embd", help="Hidden size.", rich_help_panel="Model"),
    n_head: Optional[int] = typer.Option(None, "--n-head", help="Attention heads.", rich_help_panel="Model"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Block: gpt3 (default) or llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head), as clova train --arch.", rich_help_panel="Model"),
    n_kv_head: Optional[int] = typer.Option(None, "--n-kv-head", help="llama: key/value heads (default a quarter of the heads).", rich_help_panel="Model"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Padded vocabulary size (default: the model's, 51200).", rich_help_panel="Model"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the model's context, 2048 for the paper's sizes).", rich_help_panel="Model"),
    gpus: int = typer.Option(8, "--gpus", help="GPUs per node.", rich_help_panel="Cluster"),
    nodes: int = typer.Option(1, "--nodes", help="Nodes.", rich_help_panel="Cluster"),
    gpu_type: Optional[str] = typer.Option(None, "--gpu-type", help="Hardware profile: a100 (default; with --calibrate: this GPU's), a100-40, h100, h200, a10g, l40s, v100.", rich_help_panel="Cluster"),
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", help="Memory of one GPU, GB (default: the profile's).", rich_help_panel="Cluster"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Dense bf16 peak TFLOP/s of one GPU (default: the profile's).", rich_help_panel="Cluster"),
    intra_node_gbps: Optional[float] = typer.Option(None, "--intra-node-gbps", help="Per-GPU bandwidth inside a node, GB/s one way (default: the profile's NVLink).", rich_help_panel="Cluster"),
    inter_node_gbps: Optional[float] = typer.Option(None, "--inter-node-gbps", help="Per-GPU bandwidth between nodes, GB/s one way (default: the profile's network, 25 for DGX A100).", rich_help_panel="Cluster"),
    kernel_efficiency: Optional[float] = typer.Option(None, "--kernel-efficiency", help="Fraction of peak the block's matmuls reach (default: --calibrate's measurement, else the profile's).", rich_help_panel="Cluster"),
    cpu_mem: float = typer.Option(1024.0, "--cpu-mem", help="Host memory per node, GB (for offload).", rich_help_panel="Cluster"),
    parallel: str = typer.Option("auto", "--parallel", help="auto (rank every layout; default), or one layout: zero1, zero2, zero3 or pipeline (ZeRO-1 across replicas).", rich_help_panel="Layout"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="GPUs of a node splitting each block's matrices (any mode; with auto: held fixed).", rich_help_panel="Layout"),
    pipeline_stages: Optional[int] = typer.Option(None, "--pipeline-stages", help="Stages in pipeline mode (with auto: held fixed).", rich_help_panel="Layout"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per GPU per forward pass (default 1; with auto: searched unless given).", rich_help_panel="Layout"),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute blocks in backward (with auto: searched unless given).", rich_help_panel="Layout"),
    offload: Optional[str] = typer.Option(None, "--offload", help="ZeRO-3 offload: none, cpu or nvme.", rich_help_panel="Layout"),
    global_batch: int = typer.Option(1024, "--global-batch", help="Sequences per optimizer step (sets the micro-batches per step, hence the bubble).", rich_help_panel="Layout"),
    precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32.", rich_help_panel="Layout"),
    reduce_dtype: str = typer.Option("fp32", "--reduce-dtype", help="Dtype gradients are reduced in (clova train's default fp32, or the training dtype).", rich_help_panel="Layout"),
    tokens: float = typer.Option(150e9, "--tokens", help="Tokens to train on."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Measure this GPU's kernel efficiency on one block of the model (needs CUDA) and plan with it; stored for later plans."),
    as_json: bool = typer.Option(False, "--json", help="Print the chosen layout as JSON (fields: docs/plan.md)."),
) -> None:
    """Memory, step time (compute + exposed communication + pipeline bubble) and training time per layout; the fastest that fits, and why the others lose.

    Example: [bold]clova plan --model 82b --gpus 8 --nodes 128 --gpu-mem 80[/]
    """
    from clova_train.model.config import preset_name

    if model:
        model = preset_name(model)  # a typo answers now, not after the planner's imports (torch) load
    from clova_train.training.plan import PlanConfig, estimate, plan_table, rank, ranking_table, shown, suggest, suggest_layout, why_slower
    from clova_train.training.planner.config import shape_from_file

    shape = shape_from_file(str(model_config)) if model_config else {}
    shape.update({k: v for k, v in dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, arch=arch, n_kv_head=n_kv_head).items() if v is not None})
    if not model and not shape:
        raise ClovaError("which model? give --model PRESET, --model-config FILE or --n-layer/--n-embd/--n-head")
    if parallel not in ("auto", "zero1", "zero2", "zero3", "pipeline"):
        raise ClovaError(f"--parallel must be auto, zero1, zero2, zero3 or pipeline, not {parallel!r}")
    cfg = PlanConfig(
        model=model or "custom", shape=shape, gpus=gpus, gpu_mem=gpu_mem, nodes=nodes, cpu_mem=cpu_mem,
        parallel="zero3" if parallel == "auto" else parallel, pipeline_stages=pipeline_stages or 1, tensor_parallel=tensor_parallel or 1,
        offload=offload or "none", seq_len=seq_len, micro_batch=micro_batch or 1, vocab_size=vocab_size, precision=precision,
        reduce_dtype=reduce_dtype, activation_checkpointing=bool(activation_checkpointing), tokens=tokens, global_batch=global_batch,
        gpu_type=gpu_type or "a100", peak_tflops=peak_tflops, intra_node_gbps=intra_node_gbps, inter_node_gbps=inter_node_gbps,
        kernel_efficiency=kernel_efficiency,
    )
    if calibrate:
        from clova_train.training.planner.calibrate import calibrate_and_record

        result = calibrate_and_record(cfg)
        if not as_json:
            out.print(result["line"])
        if gpu_type is None:
            cfg.gpu_type = result["gpu_type"]  # plan for the GPU just measured; its stored figure is read from now on
    if parallel != "auto":
        est = estimate(cfg)
        est["layout_hint"] = suggest_layout(cfg)
        fixes = [] if est["fits"] else suggest(cfg)
        if as_json:
            out.print_json(json.dumps({**est, "suggestions": fixes}))
            return
        out.print(plan_table(est, fixes))
        return
    fixed = dict(tensor_parallel=tensor_parallel, pipeline_stages=pipeline_stages, micro_batch=micro_batch,
                 activation_checkpointing=activation_checkpointing, offload=offload)
    ranked = rank(cfg, fixed)
    if not ranked:
        raise ClovaError(f"no layout of {cfg.world} GPUs divides the global batch {global_batch} into micro-batches; "
                         "use a --global-batch that is a multiple of the GPU count")
    best = ranked[0]
    if as_json:
        est = estimate(best.plan)
        alternatives = [{**x.summary(), "why": why_slower(x, best)} for x in shown(ranked) if x is not best]
        out.print_json(json.dumps({**est, "command": f"clova train {best.flags()}", "alternatives": alternatives}))
        return
    out.print(ranking_table(cfg, ranked))
    if best.fits:
        out.print(f"fastest layout that fits: [bold]clova train {best.flags()}[/] ({best.time['step_seconds']:,.2f} s per step)")
    else:
        out.print("[red]no layout fits this cluster[/]: more GPUs or more memory per GPU (the closest is first)")


@friendly
def train_cmd(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run dir; rerunning into it continues the run from its newest complete checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset: tiny, small, 137m, 350m, 760m, 1.3b, 6.9b, 13b, 39b, 82b."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from this Hugging Face model directory (GPT2LMHeadModel or LlamaForCausalLM; config.json + safetensors, never a pickle): its config.json gives the model's shape (no --model); with another tokenizer its embedding rows are grafted."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Block: gpt3 (default; learned positions, LayerNorm, GELU, tied head) or llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head) at the preset's depth and width.", rich_help_panel="Model"),
    n_kv_head: Optional[int] = typer.Option(None, "--n-kv-head", help="llama: key/value heads (default a quarter of the heads; 1: multi-query).", rich_help_panel="Model"),
    rope_theta: Optional[float] = typer.Option(None, "--rope-theta", help="llama: RoPE base (default 500000); may change on --resume with a longer --seq-len (context extension).", rich_help_panel="Model"),
    qk_norm: Optional[bool] = typer.Option(None, "--qk-norm/--no-qk-norm", help="llama: RMSNorm on each head's queries and keys (default off; exports as Qwen3ForCausalLM).", rich_help_panel="Model"),
    doc_mask: Optional[bool] = typer.Option(None, "--doc-mask/--no-doc-mask", help="Attention does not cross end-of-document tokens in a packed sequence; positions restart per document (default off; zero modes).", rich_help_panel="Model"),
    z_loss: Optional[float] = typer.Option(None, "--z-loss", help="Weight of the z-loss on the output softmax's log Z (PaLM: 1e-4; default 0: off).", rich_help_panel="Model"),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help="Shard dir from `clova tokenize`, optionally DIR:WEIGHT; repeat to blend."),
    data_cache: Optional[Path] = typer.Option(None, "--data-cache", help="Where the sample indices are built once and memory-mapped by every rank (default RUN_DIR/data_cache); share one across runs, or fill it ahead with `clova shards index`."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir (default: the one in the shards' manifest); its hash must match the shards'."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON with model/train/data/parallel sections (e.g. a run's config.json), loaded strictly; flags override it."),
    deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="DeepSpeed JSON to start from (deepspeed_configs/zero3.json, zero3_offload.json); flags override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR from its newest complete checkpoint, taking its config.json (flags override); without one, start it."),
    reverify: bool = typer.Option(False, "--reverify", help="Re-hash every shard file before step 1 (by default a restart re-hashes every .idx and a seeded sample of .bin blocks, and fully checks files that changed)."),
    force: bool = typer.Option(False, "--force", help="Start even if the memory plan (printed before step 1) says the run cannot fit."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the model's context, 2048 for the paper's sizes).", rich_help_panel="Batch"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step over all ranks (default 1024), by gradient accumulation.", rich_help_panel="Batch"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per rank per forward pass (default 1).", rich_help_panel="Batch"),
    batch_rampup: Optional[str] = typer.Option(None, "--batch-rampup", help="START,INCREMENT,TOKENS (Megatron's --rampup-batch-size): the global batch grows from START sequences by INCREMENT, spread evenly over the first TOKENS tokens, e.g. 32,32,4e9.", rich_help_panel="Batch"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the preset's GPT-3 value).", rich_help_panel="Optimizer"),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="End of the cosine or wsd decay (default lr/10).", rich_help_panel="Optimizer"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps (default: 375M tokens, at most 10% of the run).", rich_help_panel="Optimizer"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="After the warm-up: cosine (default; to --min-lr), constant, or wsd (stable at --lr, then linear to --min-lr over the last --decay-fraction of the run; extend a run by resuming with more --steps).", rich_help_panel="Optimizer"),
    decay_tokens: Optional[float] = typer.Option(None, "--decay-tokens", help="Cosine to --min-lr over the first N tokens, then constant (GPT-3: 260e9; default: to the last step).", rich_help_panel="Optimizer"),
    decay_fraction: Optional[float] = typer.Option(None, "--decay-fraction", help="--schedule wsd: share of the run's tokens spent decaying, at its end (default 0.2).", rich_help_panel="Optimizer"),
    freeze_except_embeddings: Optional[int] = typer.Option(None, "--freeze-except-embeddings", help="With --init-from onto another tokenizer: train only the rebuilt embedding (and untied head) rows for the first N steps (EEVE's first stage).", rich_help_panel="Optimizer"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.1).", rich_help_panel="Optimizer"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Global gradient-norm clip (default 1.0; 0: off).", rich_help_panel="Optimizer"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps to train.", rich_help_panel="Length"),
    train_tokens: Optional[float] = typer.Option(None, "--train-tokens", help="Tokens to train on, e.g. 150e9 (rounded up to whole steps).", rich_help_panel="Length"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU).", rich_help_panel="Parallelism"),
    parallel_mode: Optional[str] = typer.Option(None, "--parallel", help="auto (default: the fastest layout `clova plan` finds for these devices, said in one line and recorded in config.json; a rerun keeps the run's mode), zero1/zero2 (optimizer state / + gradients sharded, full weights per rank), zero3 (everything sharded, optional offload) or pipeline (layers in stages, ZeRO-1).", rich_help_panel="Parallelism"),
    reduce_dtype: Optional[str] = typer.Option(None, "--reduce-dtype", help="Under bf16/fp16, accumulate and all-reduce gradients in fp32 (default, exact) or in the training dtype (bf16/fp16: less traffic, 8-bit-mantissa sums).", rich_help_panel="Parallelism"),
    compile_blocks: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile each transformer block (default off).", rich_help_panel="Parallelism"),
    pipeline_stages: Optional[int] = typer.Option(None, "--pipeline-stages", help="Pipeline stages with --parallel pipeline (default: one per rank).", rich_help_panel="Parallelism"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="Ranks that split each block's matrices (Megatron's tensor parallelism; consecutive ranks of one node), with any --parallel mode.", rich_help_panel="Parallelism"),
    partition: Optional[str] = typer.Option(None, "--partition", help="How --parallel pipeline cuts layers into stages: parameters (default), uniform or type:REGEX (e.g. type:Block).", rich_help_panel="Parallelism"),
    offload: Optional[str] = typer.Option(None, "--offload", help="ZeRO-3 offload: none, cpu or nvme.", rich_help_panel="Parallelism"),
    nvme_path: Optional[str] = typer.Option(None, "--nvme-path", help="Local NVMe directory for --offload nvme.", rich_help_panel="Parallelism"),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute blocks in the backward pass.", rich_help_panel="Parallelism"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (default 1000).", rich_help_panel="Checkpoints and logs"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation loss every N steps (default 1000; 0: never).", rich_help_panel="Checkpoints and logs"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Validation sequences per evaluation (default 256).", rich_help_panel="Checkpoints and logs"),
    eval_task: Optional[List[str]] = typer.Option(None, "--eval-task", help="Few-shot task scored at every evaluation on the model in memory, TASK=DATA[:TRAIN] as clova eval takes them (e.g. nsmc=nsmc_test.tsv:nsmc_train.tsv); repeat for more; logged as eval/TASK/METRIC.", rich_help_panel="Checkpoints and logs"),
    eval_shots: Optional[int] = typer.Option(None, "--eval-shots", help="Demonstrations per prompt for --eval-task (default 0; needs TRAIN).", rich_help_panel="Checkpoints and logs"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Score the first N examples of each --eval-task (default 0: all).", rich_help_panel="Checkpoints and logs"),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep the newest N complete checkpoints (default 3; 0: all).", rich_help_panel="Checkpoints and logs"),
    keep_every: Optional[int] = typer.Option(None, "--keep-every", help="Also keep every checkpoint whose step is a multiple of N (milestones; default 0: none).", rich_help_panel="Checkpoints and logs"),
    resume_step: Optional[int] = typer.Option(None, "--resume-step", help="Resume from step N's checkpoint (e.g. when the newest is damaged); newer checkpoints are discarded.", rich_help_panel="Checkpoints and logs"),
    preempt_window: Optional[float] = typer.Option(None, "--preempt-window", help="Seconds from the preemption signal to the kill (default: $CLOVA_PREEMPT_WINDOW, set by cli/train.sbatch); a slower save is warned about.", rich_help_panel="Checkpoints and logs"),
    requeue: Optional[bool] = typer.Option(None, "--requeue/--no-requeue", help="Under srun: stopped by SIGUSR1 (the time limit near), requeue the job after the checkpoint, so it resumes by itself (default: $CLOVA_REQUEUE, set by cli/train.sbatch).", rich_help_panel="Checkpoints and logs"),
    max_bad_steps: Optional[int] = typer.Option(None, "--max-bad-steps", help="Stop after N consecutive non-finite steps (default 5).", rich_help_panel="Checkpoints and logs"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s of one device for MFU (default: known accelerators).", rich_help_panel="Checkpoints and logs"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Progress line every N steps when not on a terminal (default 10).", rich_help_panel="Checkpoints and logs"),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="TensorBoard events in RUN_DIR/tensorboard (default on).", rich_help_panel="Checkpoints and logs"),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="Log every metric to this Weights & Biases project too (WANDB_MODE=offline: to RUN_DIR/wandb, uploaded later by `wandb sync`).", rich_help_panel="Checkpoints and logs"),
    wandb_entity: Optional[str] = typer.Option(None, "--wandb-entity", help="W&B team or user of --wandb's project (default: the account's).", rich_help_panel="Checkpoints and logs"),
    wandb_run_name: Optional[str] = typer.Option(None, "--wandb-run-name", help="W&B run name (default: the run dir's name).", rich_help_panel="Checkpoints and logs"),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="Log every metric to this MLflow tracking URI too: file:/path/mlruns (no server) or http://host:5000.", rich_help_panel="Checkpoints and logs"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initialisation and the sample order (default 1234).", rich_help_panel="Checkpoints and logs"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Local worker processes, one per GPU (default 1; a rerun: as many as wrote its checkpoint).", rich_help_panel="Launch"),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile: run on all its hosts (see cli/hostfile.example).", rich_help_panel="Launch"),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Rank 0's address (default: localhost or the first Slurm node).", rich_help_panel="Launch"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Rank 0's port.", rich_help_panel="Launch"),
) -> None:
    """Pre-train a GPT on shard dirs with DeepSpeed (ZeRO-1/2/3 or pipeline + ZeRO-1), resumably; under srun each task is a rank.

    Example: [bold]clova train --model 1.3b --data shards/ --out runs/1.3b --train-tokens 150e9 --nproc-per-node 8[/]
    """
    from clova_train.model.config import preset_name

    if model:
        model = preset_name(model)  # a typo answers now, not after torch and DeepSpeed load
    from clova_train.training.launch import LaunchConfig
    from clova_train.training.run.config import TrainRequest
    from clova_train.training.train import train

    request = TrainRequest(
        out=str(out_dir),
        model=model,
        model_fields=dict(arch=arch, n_kv_head=n_kv_head, rope_theta=rope_theta, qk_norm=qk_norm),
        data=list(data or []),
        data_cache=str(data_cache) if data_cache else None,
        init_from=str(init_from) if init_from else None,
        tokenizer=str(tokenizer) if tokenizer else None,
        config=str(config) if config else None,
        deepspeed=str(deepspeed) if deepspeed else None,
        resume=resume or resume_step is not None,
        resume_step=resume_step,
        force=force,
        reverify=reverify,
        train=dict(
            seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch, batch_rampup=parse_rampup(batch_rampup), lr=lr, min_lr=min_lr, warmup=warmup,
            decay_tokens=int(decay_tokens) if decay_tokens else None, schedule=schedule, decay_fraction=decay_fraction,
            freeze_except_embeddings=freeze_except_embeddings,
            weight_decay=weight_decay, grad_clip=grad_clip, steps=steps, train_tokens=int(train_tokens) if train_tokens else None, precision=precision,
            save_every=save_every, eval_every=eval_every, eval_samples=eval_samples,
            eval_tasks=list(eval_task) if eval_task else None, eval_shots=eval_shots, eval_limit=eval_limit, keep_last=keep_last,
            keep_every=keep_every, preempt_window=preempt_window, requeue=requeue,
            max_bad_steps=max_bad_steps, peak_tflops=peak_tflops, log_every=log_every, tensorboard=tensorboard, seed=seed,
            wandb=wandb, wandb_entity=wandb_entity, wandb_run_name=wandb_run_name, mlflow=mlflow, doc_mask=doc_mask, z_loss=z_loss,
        ),
        parallel=dict(mode=parallel_mode, offload=offload, nvme_path=nvme_path, activation_checkpointing=activation_checkpointing, pipeline_stages=pipeline_stages,
                      tensor_parallel=tensor_parallel, partition=partition, reduce_dtype=reduce_dtype, compile=compile_blocks),
    )
    launch = LaunchConfig(nproc_per_node=nproc_per_node, hostfile=str(hostfile) if hostfile else None, master_addr=master_addr, master_port=master_port)
    code = train(request, launch)
    if code:
        raise typer.Exit(code)
