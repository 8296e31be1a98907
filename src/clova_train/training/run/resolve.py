"""From what `clova train` was asked to a :class:`RunSpec`: flags over a ``--config`` file over a ``--deepspeed`` template over defaults."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from clova_train.core.config import from_dict, read_json_object
from clova_train.core.errors import ClovaError
from clova_train.model.config import LLAMA_FIELDS, ModelConfig, pad_vocab
from clova_train.training.run.config import RunSpec, TrainConfig, TrainRequest
from clova_train.training.parallel.ds_config import ParallelConfig, template_defaults, zero_stage
from clova_train.training.parallel.dims import ParallelDims
from clova_train.training.parallel.ds_validate import validate_deepspeed
from clova_train.training.parallel.pipeline import check_partition
from clova_train.training.parallel.tensor import check_tensor_parallel
from clova_train.training.run.auto import AUTO
from clova_train.training.run.preflight import check_inputs, check_run_dir
from clova_train.training.rundir import CONFIG_FILE, DATA_CACHE_DIR
from clova_train.training.data.sampler import DataConfig, data_config_from_specs, token_weights

CONFIG_SECTIONS = ("model", "train", "data", "parallel", "deepspeed", "tokenizer", "init_from", "run")


def _read_config_file(path: Path) -> dict:
    cfg = read_json_object(path)
    unknown = sorted(set(cfg) - set(CONFIG_SECTIONS))
    if unknown:
        raise ClovaError(f"{path}: unknown section(s) {', '.join(unknown)}; accepted: {', '.join(CONFIG_SECTIONS)}")
    return cfg


def _layer(cls, where: str, section: str, *layers: dict, flags: dict):
    """Build ``cls`` from dict layers (later wins), strictly, then the flags that were given."""
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(cls, merged, where=where, section=section)


def _shard_fingerprint(manifest: dict) -> str:
    """Identifies a shard dir's training data by content, wherever it is mounted."""
    from clova_train.shards.index import split_fingerprint

    return split_fingerprint(manifest, "train")


def _auto_layout(run_dir: Path, model: ModelConfig, train: TrainConfig, given: dict, parallel: ParallelConfig, world: int) -> ParallelConfig:
    """--parallel auto: the mode an existing run recorded, else the planner's fastest layout that fits; said in one line by rank 0."""
    import os

    from clova_train.core.progress import console
    from clova_train.training.run.auto import choose, recorded_mode

    kept = recorded_mode(run_dir)
    if kept is not None:
        line = f"--parallel auto: {kept}, the mode {run_dir / CONFIG_FILE} records (a run never switches modes)"
        parallel = replace(parallel, mode=kept, chosen=line)
    else:
        fields, line = choose(model, train, {k: v for k, v in given.items() if k != "mode"}, world,
                              no_pipeline=bool(train.eval_tasks) or train.doc_mask)
        parallel = replace(parallel, **fields, chosen=line)
    if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
        console.print(line)
    return parallel


def prepare(req: TrainRequest, world_size: int, *, check: bool = True) -> RunSpec:
    """Resolve a request into a RunSpec; with ``check``, also verify shards and vocabulary (before step 1)."""
    from clova_train.shards.format import read_manifest
    from clova_train.tokenizer.bpe import ClovaTokenizer

    run_dir = Path(req.out).resolve()
    config_path = Path(req.config) if req.config else None
    if req.resume and config_path is None and (run_dir / CONFIG_FILE).is_file():
        config_path = run_dir / CONFIG_FILE
    file_cfg = _read_config_file(config_path) if config_path else {}
    where = str(config_path) if config_path else "flags"

    # Data: flags replace the file's list; paths become absolute so the run dir is self-describing.
    data = data_config_from_specs(req.data) if req.data else from_dict(DataConfig, file_cfg.get("data", {}), where=where, section="data")
    if not data.paths:
        raise ClovaError("no training data: give --data SHARD_DIR[:WEIGHT]...")
    manifests = [read_manifest(p) for p in data.paths]
    cache = req.data_cache or data.cache or str(run_dir / DATA_CACHE_DIR)
    data = DataConfig(
        paths=[str(Path(p).resolve()) for p in data.paths],
        weights=data.weights or token_weights(manifests),
        cache=str(Path(cache).resolve()),
        cache_timeout=data.cache_timeout,
    )

    # Tokenizer: the flag, else the file's, else the one the shards were made with.
    tok_path = req.tokenizer or (file_cfg.get("tokenizer") or {}).get("path") or manifests[0]["tokenizer"]["path"]
    tok = ClovaTokenizer.load(tok_path)
    for path, man in zip(data.paths, manifests):
        if man["tokenizer"]["hash"] != tok.hash:
            raise ClovaError(
                f"{path} was tokenized with tokenizer {man['tokenizer']['hash'][:12]} ({man['tokenizer'].get('path')}) "
                f"but training would use {tok.hash[:12]} ({tok_path}); retokenize it with this tokenizer "
                "or pass --tokenizer with the one recorded in its manifest.json"
            )

    # DeepSpeed template: its settings sit between our defaults and the file/flags.
    from clova_train.training.parallel.ds_config import load_template

    template = load_template(req.deepspeed) if req.deepspeed else dict(file_cfg.get("deepspeed") or {})
    validate_deepspeed(template, req.deepspeed or f"{where}: deepspeed")  # here, not in every rank after they start
    tmpl_train, tmpl_par = template_defaults(template)
    file_train = dict(file_cfg.get("train", {}))
    if req.train.get("steps") is not None or req.train.get("train_tokens") is not None:
        # A length flag replaces the file's length, whichever way the file put it.
        file_train.pop("steps", None), file_train.pop("train_tokens", None)
    train = _layer(TrainConfig, where, "train", tmpl_train, file_train, flags=req.train)
    file_par = dict(file_cfg.get("parallel", {}))
    given_par = {**tmpl_par, **file_par, **{k: v for k, v in req.parallel.items() if v is not None}}
    auto = given_par.get("mode") in (None, AUTO)  # --parallel auto, the default: resolved below, once model and batch are
    if auto:
        file_par.pop("mode", None), tmpl_par.pop("mode", None)
    parallel = _layer(ParallelConfig, where, "parallel", tmpl_par, file_par,
                      flags={k: v for k, v in req.parallel.items() if not (k == "mode" and v == AUTO)})

    # Model: --init-from's config.json, else the preset flag, else the file's model section; the vocabulary comes from the tokenizer.
    given = {k: v for k, v in req.model_fields.items() if v is not None}
    init_from = None
    record = file_cfg.get("init_from")
    if record is not None:
        from clova_train.training.initfrom.prepare import recorded_source

        recorded_source(record, where)
    init_path = req.init_from or (record or {}).get("path")
    if init_path:
        from clova_train.training.initfrom.prepare import check_unchanged, prepare_source, run_model

        if req.model:
            raise ClovaError("--model and --init-from both give the model's shape; drop --model (the shape comes from the "
                             "source's config.json)")
        model, init_from = prepare_source(init_path, tok)
        if req.resume and record and Path(record["path"]).resolve() == Path(init_from["path"]):
            check_unchanged(init_from, record, where)
        model = run_model(model, file_cfg.get("model"), given, where)
    elif req.model:
        model = ModelConfig.from_name(req.model, vocab_size=pad_vocab(tok.vocab_size), **given)
    elif "model" in file_cfg:
        fields = dict(file_cfg["model"])
        fields.setdefault("vocab_size", pad_vocab(tok.vocab_size))
        if "arch" in given and given["arch"] != fields.get("arch", "gpt3"):
            # Another block: the derived fields of the file's arch do not carry over.
            fields = {k: v for k, v in fields.items() if k not in LLAMA_FIELDS}
        model = from_dict(ModelConfig, {**fields, **given}, where=where, section="model")
    else:
        raise ClovaError("which model? give --model PRESET (e.g. tiny, 137m, 1.3b) or a --config with a model section")
    if tok.vocab_size > model.vocab_size:
        raise ClovaError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.vocab_size} embeddings; "
            f"set model.vocab_size to at least {pad_vocab(tok.vocab_size)} or drop it to take the tokenizer's"
        )
    if req.train.get("seq_len") is None and "seq_len" not in {**tmpl_train, **file_train}:
        train = replace(train, seq_len=model.block_size)  # a preset's own context is the default
    if train.seq_len > model.block_size and model.arch == "llama":
        model = replace(model, block_size=train.seq_len)  # RoPE has no table: the context is what is trained
    if train.seq_len > model.block_size:
        raise ClovaError(
            f"--seq-len {train.seq_len} exceeds the model's {model.block_size} positions; "
            "use a shorter --seq-len or a --config whose model section sets block_size"
        )
    train = train.resolved(model)
    if auto:
        parallel = _auto_layout(run_dir, model, train, given_par, parallel, world_size)
    if train.eval_tasks:
        from clova_train.training.trainer.fewshot import TaskSpec, check_eval_tasks

        check_eval_tasks(train.eval_tasks, train.eval_shots)
        if parallel.mode == "pipeline":
            raise ClovaError("--eval-task scores the model in memory under zero1, zero2 and zero3; in pipeline mode the stages "
                             "hold different layers: export a checkpoint (clova export) and run clova eval on it")
        train = replace(train, eval_tasks=[TaskSpec.parse(t).absolute() for t in train.eval_tasks])
    stages = parallel.stages(world_size)
    zero_stage(template, parallel)  # ZeRO-2/3 with pipeline stages: refused here, before any rank starts
    if parallel.mode == "pipeline":
        parallel = replace(parallel, pipeline_stages=stages)
        check_partition(model, parallel, stages)
        if train.doc_mask:
            raise ClovaError("--doc-mask runs under zero1, zero2 and zero3; pipeline stages pass only hidden states between them, "
                             "not the document boundaries (use --parallel zero1/zero3, with --tensor-parallel for size)")
    check_tensor_parallel(model, ParallelDims.from_config(parallel, world_size), ranks_per_node=None)  # nodes: checked by each rank
    replicas = parallel.replicas(world_size)
    micro_world = train.micro_batch * replicas
    if train.global_batch % micro_world:
        raise ClovaError(
            f"global batch {train.global_batch} is not a multiple of micro-batch {train.micro_batch} x {replicas} "
            f"data-parallel replicas; use a --global-batch that is a multiple of {micro_world}"
        )
    if train.batch_rampup and any(v % micro_world for v in train.batch_rampup[:2]):
        raise ClovaError(
            f"--batch-rampup {train.batch_rampup[0]},{train.batch_rampup[1]},...: START and INCREMENT must be multiples of "
            f"micro-batch {train.micro_batch} x {replicas} data-parallel replicas ({micro_world}), so every step's batch splits evenly"
        )

    identity = {
        "model": model.identity(),
        "seq_len": train.seq_len,
        "global_batch": train.global_batch,
        "seed": train.seed,
        "tokenizer": tok.hash,
        "data": [{"shards": _shard_fingerprint(m), "weight": w / sum(data.weights)} for m, w in zip(manifests, data.weights)],
        # The mode, not the layout: a checkpoint resumes on another world size, stage count or
        # partition (training/checkpoints/reshard.py), but ZeRO-3 and pipeline runs do not continue each other.
        # Under --parallel auto this is the resolved mode, never "auto": a rerun must find the same one (run/auto.py).
        "parallel": {"mode": parallel.mode},
    }
    if init_from:  # only then: the identities (and so the resumability) of runs from seeded weights stay as they were
        from clova_train.training.initfrom.prepare import identity as source_identity

        identity["init_from"] = source_identity(init_from)
    if train.freeze_except_embeddings and not (init_from and init_from.get("graft")):
        raise ClovaError("--freeze-except-embeddings trains the embedding rows --init-from rebuilt for a new tokenizer; "
                         "this run has none (no --init-from, or the source's own tokenizer)")
    spec = RunSpec(
        out=str(run_dir),
        model=model,
        train=train,
        data=data,
        parallel=parallel,
        deepspeed_template=template,
        tokenizer={"path": str(Path(tok_path).resolve()), "hash": tok.hash, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
        world_size=world_size,
        identity=identity,
        resume=req.resume,
        force=req.force,
        resume_step=req.resume_step,
        reverify=req.reverify,
        init_from=init_from,
    )
    check_run_dir(spec)
    if check:
        check_inputs(spec)
    return spec
