"""The training loop: single process, or DistributedDataParallel under torchrun.

Each epoch ends with validation (mean AUROC over findings), a best-by-validation
checkpoint with per-finding decision thresholds chosen on validation, and an atomic
``last_state.safetensors`` from which ``resume=True`` continues: a killed run loses at most
the epoch in flight.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxrtool.train._distributed as distributed
from cxrtool._workers import fork_safe_opencv, worker_init
from cxrtool.models.checkpoint import ModelCard, load_tree, save_checkpoint, save_tree
from cxrtool.models.heads import head_classes
from cxrtool.models.network import CXRClassifier, mixed_precision, pick_device, precision_name
from cxrtool.preprocess import Preprocessing, normalise
from cxrtool.train.cache import DiskImageCache
from cxrtool.train.config import TrainConfig, absolute_paths, write_config
from cxrtool.train.datasets import Augmentation, ImageCache, LabelledStudies
from cxrtool.train.losses import LossContext, build_loss, check_head_gives

CHECKPOINT_NAME = "model.safetensors"
STATE_NAME = "last_state.safetensors"
CONFIG_NAME = "config.yaml"
# Settings that must not change when resuming, or the saved state would not fit the run.
_RESUME_INVARIANTS = ("task", "architecture", "output_stride", "padding", "input_size", "labels", "findings", "seed",
                      "val_fraction", "batch_size",
                      "init", "head", "loss", "lse_r", "head_dim", "decoder_layers", "decoder_heads",
                      "decoder_self_attention", "lga_text", "lga_layers", "lga_cooccurrence_bias", "preset",
                      "sampling", "logit_adjustment", "zero_shot", "prompts", "projections", "unlabelled",
                      "feedback_every", "feedback_fraction", "feedback_cam", "feedback_layer")


@dataclass
class TrainEvent:
    """What the loop reports to its caller (the CLI draws progress from these)."""

    kind: str  # "message" | "cache" | "phase" (a named step: message, step of steps) | "batch" | "epoch" | "done"
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float = math.nan
    val_auroc: float = math.nan
    best_auroc: float = math.nan
    message: str = ""


@dataclass
class TrainResult:
    checkpoint: Path
    config_path: Path
    best_auroc: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    skipped_rows: int = 0
    n_unlabelled: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def parameter_groups(model: torch.nn.Module, config: TrainConfig,
                     criterion: torch.nn.Module | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The optimiser's parameter groups, and what the model card records of them.

    Two parts, each with its own learning rate: the backbone (``lr``) and everything after
    it, the head, the zero-shot text branch and the loss terms' own modules (paper 4's
    projection heads and radiomics encoder: ``head_lr``, ``lr`` when 0); attention heads
    train best slower than a convolutional backbone from scratch, as Query2Label's and
    GL-MLL's recipes do. Within each, normalisation and bias parameters (one dimension) and
    the heads' embeddings (``Head.embeddings``: label queries and the like) get no weight
    decay, which would only pull them towards zero.
    """
    head_lr = config.head_lr or config.lr
    embeddings = {f"head.{name}" for name in getattr(model.head, "embeddings", ())}
    groups: dict[tuple[str, bool], list[tuple[str, torch.nn.Parameter]]] = {}
    named = list(model.named_parameters())
    if criterion is not None:
        named += [(f"loss.{name}", parameter) for name, parameter in criterion.named_parameters()]
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "loss terms" if name.startswith("loss.") else "head"
        decays = parameter.ndim > 1 and name not in embeddings
        groups.setdefault((part, decays), []).append((name, parameter))
    built, record = [], {}
    for (part, decays), members in sorted(groups.items()):
        lr = config.lr if part == "backbone" else head_lr
        weight_decay = config.weight_decay if decays else 0.0
        built.append({"params": [p for _, p in members], "lr": lr, "weight_decay": weight_decay,
                      "name": f"{part}{'' if decays else ' (no decay)'}"})
        entry = record.setdefault(part, {"lr": lr, "weight_decay": config.weight_decay, "parameters": 0})
        entry["parameters"] += sum(p.numel() for _, p in members)
    record["no_decay"] = sorted(name for (part, decays), members in groups.items() if not decays for name, _ in members)
    record["warmup_epochs"] = config.warmup_epochs
    return built, record


def mean_auroc(targets: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """Mean over findings with both classes present in the known (non-NaN) labels."""
    from cxrtool.evaluate.metrics import auroc, macro_average

    per_finding = [float(v) for v in np.atleast_1d(auroc(targets, scores))]
    return macro_average(per_finding), per_finding


def train(config: TrainConfig, *, resume: bool = False, progress: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Train a classifier as the configuration says; returns where the checkpoint is.

    Example:
        >>> from cxrtool.train import load_config, train
        >>> result = train(load_config(overrides={"labels": "Data_Entry.csv", "epochs": 2}))
        >>> result.best_auroc
    """
    from cxrtool.data.labels import patient_split, read_unlabelled

    config.validate()
    requested = pick_device(config.device)
    dist_info = distributed.setup(requested)
    device = distributed.device_for(dist_info.local_rank, requested)
    say = progress if (progress is not None and dist_info.is_main) else (lambda event: None)
    out = Path(config.out)
    state_path = out / STATE_NAME

    try:
        seed_everything(config.seed)
        if dist_info.enabled:
            torch.set_num_threads(max(1, torch.get_num_threads() // dist_info.world_size))

        table = training_table(config)
        if config.projections:
            say(TrainEvent("message", message=f"{len(table)} images of projection {', '.join(config.projections)}"))
        if config.task == "view":
            counts = ", ".join(f"{int(table.targets[:, j].sum())} {name}" for j, name in enumerate(table.findings))
            say(TrainEvent("message", message=f"a view classifier: {counts}"))
        findings = list(table.findings)
        if len(table) < 4:
            raise ValueError(f"{config.labels}: only {len(table)} labelled images with files on disk; need at least 4")
        say(TrainEvent("message", message=f"{len(table)} images with labels ({table.skipped} rows skipped: image not on disk)"))
        train_idx, val_idx = patient_split(table, val_fraction=config.val_fraction, seed=config.seed)
        never = [f for j, f in enumerate(findings) if not (table.targets[train_idx, j] == 1).any()]
        if never and config.task != "view":
            # E.g. a label set's name on a table that spells a finding otherwise (PadChest's lists
            # are open-vocabulary): the model would learn that it is never there.
            say(TrainEvent("message", message=f"warning: {len(never)} of {len(findings)} findings never positive in "
                                              f"the training split ({', '.join(never[:6])}{', ...' if len(never) > 6 else ''}): "
                                              "check their spelling in the labels, or leave them out with --findings"))
        paths = [str(table.resolve_image(i)) for i in range(len(table))]
        targets, views, labelled_train = table.targets, list(table.views), train_idx
        if config.unlabelled:
            # rows after the table's: targets all unknown, so only the radiomics term sees them
            extra, missing = read_unlabelled(config.unlabelled)
            say(TrainEvent("message", message=f"{len(extra)} unlabelled images for the radiomics contrast"
                                              + (f" ({missing} rows name no file on disk)" if missing else "")))
            if config.sampling == "class_aware":
                say(TrainEvent("message", message="warning: class-aware sampling draws images by their positive labels, "
                                                  "so it never draws the unlabelled ones; use --sampling uniform"))
            targets = np.concatenate([targets, np.full((len(extra), len(findings)), np.nan, dtype=targets.dtype)])
            views += ["UNKNOWN"] * len(extra)
            train_idx = np.concatenate([np.asarray(train_idx), np.arange(len(paths), len(paths) + len(extra))])
            paths += extra
        parent = _parent(config, say) if config.init else None
        prep = Preprocessing.from_dict(parent.card.preprocessing) if parent else Preprocessing(input_size=config.input_size)

        cache = _image_cache(config, paths, prep, dist_info, say)
        if cache is not None and cache.failed:
            first = next(iter(cache.failed.items()))
            ignored = f"{len(cache.failed)} unreadable images ignored (e.g. {paths[first[0]]}: {first[1]})"
            say(TrainEvent("message", message=ignored))

        settings = config.to_dict()
        text = _text_side(config, findings) if config.zero_shot else None
        model = CXRClassifier(config.architecture, findings, pretrained=config.pretrained and parent is None,
                              drop_rate=config.drop_rate, output_stride=config.output_stride, head=config.head,
                              padding=config.padding,
                              head_settings=head_classes()[config.head].settings_from(settings),
                              text_dim=text["dim"] if text else 0)
        if text is not None:
            model.text.prompts.copy_(torch.from_numpy(text.pop("pairs")))
        if parent is not None:
            say(TrainEvent("message", message=parent.initialise(model)))
        priors = model.head.fit_priors(table.targets[labelled_train], settings,
                                       lambda text: say(TrainEvent("message", message=text)))
        criterion = build_loss(config.loss, LossContext(findings, table.targets[labelled_train], settings,
                                                        lambda text: say(TrainEvent("message", message=text)),
                                                        width=model.head.width))
        check_head_gives(criterion, model.head.name, model.gives)

        train_set = LabelledStudies(paths, targets, prep, augment=Augmentation() if config.augment else None,
                                    cache=cache, seed=config.seed, copies=2 if "image_2" in criterion.batch_needs else 1,
                                    view_positions=views)
        train_view = torch.utils.data.Subset(train_set, train_idx)
        val_set = LabelledStudies(paths, targets, prep, cache=cache, seed=config.seed, view_positions=views)
        # Channels-last: about 1.3x faster convolutions on CPU (oneDNN) and on tensor cores.
        model = model.to(device, memory_format=torch.channels_last)
        wrapped: torch.nn.Module = model
        if dist_info.enabled:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        criterion = criterion.to(device)
        groups, optimiser_record = parameter_groups(model, config, criterion)
        feedback = _feedback_run(config, model, criterion, train_idx, targets, val_set, out, device, say)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        per_rank = math.ceil(len(train_idx) / dist_info.world_size)
        steps_per_epoch = max(1, math.ceil(per_rank / config.batch_size))
        if config.max_train_batches:
            steps_per_epoch = min(steps_per_epoch, config.max_train_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch))
        )
        precision = mixed_precision(device) if config.amp else None
        use_amp, amp_dtype = precision is not None, precision or torch.bfloat16
        scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)

        start_epoch, best_auroc, best_epoch, history = 0, -math.inf, -1, []
        cycle, cycles = None, []  # the feedback loop's current cycle, and what each cycle did
        if resume and state_path.exists():
            state = load_tree(state_path)
            saved, current = absolute_paths(state["config"]), absolute_paths(config.to_dict())
            defaults = TrainConfig().to_dict()  # a setting newer than the interrupted run had its default then
            changed = [k for k in _RESUME_INVARIANTS if saved.get(k, defaults[k]) != current.get(k)]
            if changed:
                raise ValueError(
                    f"cannot resume {state_path}: {', '.join(changed)} differ from the interrupted run "
                    f"(start a new --out, or restore those settings)"
                )
            model.load_state_dict(state["model"])
            criterion.load_state_dict(state.get("loss", {}))  # terms' running state (prototypes)
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError:
                raise ValueError(f"cannot resume {state_path}: its optimiser state has another layout of parameter "
                                 "groups (written by an older cxrtool); start a new --out") from None
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            start_epoch = int(state["epoch"]) + 1
            best_auroc, best_epoch, history = float(state["best_auroc"]), int(state["best_epoch"]), list(state["history"])
            if feedback is not None and state.get("feedback"):
                cycle, cycles = feedback.resume(state["feedback"], len(paths)), list(state["feedback"]["cycles"])
            say(TrainEvent("message", message=f"resuming after epoch {start_epoch} of {config.epochs} (best mean AUROC {best_auroc:.4f})"))
        elif resume:
            say(TrainEvent("message", message=f"nothing to resume in {out}: starting afresh"))

        if dist_info.is_main:
            write_config(config, out / CONFIG_NAME)

        for epoch in range(start_epoch, config.epochs):
            if feedback is not None and epoch > 0 and epoch % config.feedback_every == 0:
                cycle = feedback.next_cycle(model, epoch // config.feedback_every, cycle, dist_info, len(paths))
                cycles.append(cycle.record() | {"before_epoch": epoch + 1})
            train_set.set_epoch(epoch)
            order = _epoch_order(len(train_idx), config.seed, epoch, dist_info,
                                 targets=targets[train_idx] if config.sampling == "class_aware" else None)
            loader = torch.utils.data.DataLoader(
                train_view,
                batch_size=config.batch_size,
                sampler=order,
                num_workers=config.workers,
                worker_init_fn=worker_init if config.workers else None,
                pin_memory=device.type == "cuda",
                drop_last=len(order) > config.batch_size,
                persistent_workers=False,
            )
            wrapped.train()
            running, seen, parts_sum = 0.0, 0, {}
            started = time.monotonic()
            with fork_safe_opencv():
                batches = iter(loader)
            for step, batch in enumerate(batches):
                if step >= steps_per_epoch:
                    break
                batch = _to_device(batch, device)
                images = batch["image"]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    output = wrapped(images, full=True)
                loss, parts = criterion(output, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_gradients(dist_info, criterion)  # the loss terms' own modules: not under DDP
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                # The loss and its terms read back together, not one read-back a term.
                total, *values = torch.stack([v.float() for v in (loss.detach(), *parts.values())]).tolist()
                for name, value in zip(parts, values, strict=True):
                    parts_sum[name] = parts_sum.get(name, 0.0) + value * images.shape[0]
                running += total * images.shape[0]
                seen += images.shape[0]
                say(TrainEvent("batch", epoch=epoch + 1, epochs=config.epochs, step=step + 1,
                               steps=min(steps_per_epoch, len(loader)), loss=running / max(seen, 1)))

            val_targets, val_scores = _validate(model, val_set, val_idx, config, device, dist_info, use_amp, amp_dtype)
            auroc, per_finding = mean_auroc(val_targets, val_scores)
            record = {
                "epoch": epoch + 1,
                "train_loss": running / max(seen, 1),
                **({"train_loss_terms": {name: round(value / max(seen, 1), 6) for name, value in parts_sum.items()}}
                   if len(parts_sum) > 1 else {}),
                "val_mean_auroc": None if math.isnan(auroc) else round(auroc, 6),
                "seconds": round(time.monotonic() - started, 1),
            }
            history.append(record)
            improved = not math.isnan(auroc) and auroc > best_auroc
            if dist_info.is_main:
                if improved or not (out / CHECKPOINT_NAME).exists():
                    best_auroc, best_epoch = (auroc if not math.isnan(auroc) else best_auroc), epoch + 1
                    card = _card(config, findings, prep, table, labelled_train, val_idx, val_targets, val_scores,
                                 per_finding, auroc, epoch + 1, history, parent, head_settings=model.head.settings(),
                                 priors=priors, text=text, optimiser=optimiser_record, precision=precision,
                                 feedback=feedback.record(cycles, len(paths) - len(table)) if feedback else None)
                    save_checkpoint(out / CHECKPOINT_NAME, model, card,
                                    training={f"loss.{k}": v for k, v in criterion.state_dict().items()})
                save_tree(
                    state_path,
                    {
                        "config": absolute_paths(config.to_dict()),
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "loss": criterion.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": {"torch": torch.get_rng_state()},
                        "best_auroc": best_auroc,
                        "best_epoch": best_epoch,
                        "history": history,
                        **({"feedback": {"number": cycle.number, "key": cycle.key, "cycles": cycles}}
                           if cycle is not None else {}),
                    },
                )
            best_auroc = distributed.broadcast_object(dist_info, best_auroc)
            say(TrainEvent("epoch", epoch=epoch + 1, epochs=config.epochs, loss=record["train_loss"],
                           val_auroc=auroc, best_auroc=best_auroc))
            distributed.barrier(dist_info)

        result = TrainResult(
            checkpoint=out / CHECKPOINT_NAME,
            config_path=out / CONFIG_NAME,
            best_auroc=best_auroc,
            best_epoch=best_epoch,
            epochs_run=config.epochs - start_epoch,
            history=history,
            n_train=len(labelled_train),
            n_val=len(val_idx),
            skipped_rows=table.skipped,
            n_unlabelled=len(paths) - len(table),
        )
        say(TrainEvent("done", epochs=config.epochs, best_auroc=best_auroc))
        return result
    finally:
        # The DDP wrapper's reducer talks to the process group when it is destroyed: let it
        # go first. Freed after the group (when this frame is), it can wait on the other
        # rank for ever.
        wrapped = model = None
        gc.collect()
        distributed.teardown(dist_info)


def training_table(config: TrainConfig):
    """The labelled table a run trains on, its rows in the order the run numbers them (the
    feedback cycles' positions are these rows, then the unlabelled images'): the label
    file as the config reads it, only its projections, or a view classifier's table."""
    from cxrtool.data.labels import read_labels

    table = read_labels(config.labels, image_root=config.images or None, fmt=config.labels_format,
                        findings=config.findings or None, uncertain=config.uncertain)
    if config.projections:
        table = table.of_projections(config.projections)
    if config.task == "view":
        table = table.projections()
    return table


def _image_cache(config: TrainConfig, paths: list[str], prep: Preprocessing, dist_info: distributed.DistInfo,
                 say: Callable[[TrainEvent], None]) -> ImageCache | DiskImageCache | None:
    """The run's input squares as ``image_cache`` says: the persistent cache (each rank
    decodes its share of what it lacks, then all read the whole), this process's memory, or
    None (each image read and fitted whenever it is drawn)."""
    from cxrtool.errors import OutputError
    from cxrtool.train.cache import persistent_folder

    def progress(done: int, total: int) -> None:
        say(TrainEvent("cache", step=done, steps=total))

    choice = config.image_cache if config.cache_images else "off"
    folder = persistent_folder(choice)
    if folder is not None:
        try:
            cache = DiskImageCache(paths, prep, folder, workers=config.workers, progress=progress,
                                   share=(dist_info.rank, dist_info.world_size),
                                   wait=lambda: distributed.barrier(dist_info))
        except OutputError as error:
            # Only auto falls back, and never under torchrun: a rank that left the others
            # would leave them waiting at the barrier.
            if choice != "auto" or dist_info.enabled:
                raise
            say(TrainEvent("message", message=f"image cache: {error}; keeping the images in memory instead"))
        else:
            say(TrainEvent("message", message=f"image cache: {cache.reused} of {len(paths)} images found there, "
                                              f"{cache.decoded} decoded now ({cache.folder}; "
                                              f"{cache.nbytes / 2**20:.1f} MiB of squares)"))
            return cache
    if choice == "off":
        return None
    needed = ImageCache.bytes_needed(len(paths), prep)
    if needed > 8 * 2**30:
        say(TrainEvent("message", message=f"image cache would need {needed / 2**30:.1f} GiB of memory: "
                                          "reading from disk instead (image_cache auto keeps it on disk)"))
        return None
    return ImageCache(paths, prep, workers=config.workers, progress=progress)


class _Feedback:
    """The feedback loop of a run whose loss has the radiomics term (paper 4): the cycles
    (:class:`cxrtool.train.feedback.FeedbackRun`), the term that reads their features, and
    what the card records."""

    def __init__(self, run, term, config: TrainConfig, say) -> None:
        self.run, self.term, self.config, self.say = run, term, config, say

    def next_cycle(self, model: torch.nn.Module, number: int, previous, info: distributed.DistInfo, total: int):
        """Cycle ``number`` on the model as it is now (computed by the main process, or read
        back from the cache), installed in the term."""
        from cxrtool.explain.faithfulness import border_band_share
        from cxrtool.train.feedback import Cycle

        found: Cycle | None = self.run.cycle(model, number, previous) if info.is_main else None
        # the main process's key: the other ranks' batch-norm statistics differ from its own
        # (DDP broadcasts buffers at each forward, then each rank's forward updates them)
        key = distributed.broadcast_object(info, found.key if found is not None else None)
        if found is None:
            found = self.run.cache.load(number, key)
            if found is None:
                raise RuntimeError(f"feedback cycle {number}: the main process's cache is not readable here "
                                   f"({self.run.cache.folder}): the ranks need a shared --out")
        self._install(found, total)
        dropped = sum(found.dropped.values())
        reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(found.dropped.items(), key=lambda kv: -kv[1])[:3])
        if found.reused:
            summary = "read back from its cache"
        else:
            summary = (f"{found.refreshed} maps, {found.refreshed - dropped} regions measured, in "
                       f"{found.seconds_maps + found.seconds_radiomics:.1f} s (maps {found.seconds_maps:.1f} s, "
                       f"radiomics {found.seconds_radiomics:.1f} s)")
        band = found.in_border_band
        where = "" if band is None else f", {band:.0%} of them centred in the film's outer tenth ({border_band_share():.0%} of its area)"
        self.say(TrainEvent("message", message=f"feedback cycle {number}: {summary}; {int(found.valid.sum())} of "
                                               f"{len(found.positions)} images have a region{where}"
                                               + (f"; {dropped} dropped ({reasons})" if dropped else "")))
        return found

    def resume(self, saved: dict[str, Any], total: int):
        """The cycle an interrupted run was using, from its cache."""
        number, key = int(saved["number"]), str(saved["key"])
        found = self.run.cache.load(number, key)
        if found is None:
            raise ValueError(f"cannot resume: feedback cycle {number}'s features ({self.run.cache.path(number, key)}) "
                             "are gone; start a new --out")
        self._install(found, total)
        return found

    def _install(self, cycle, total: int) -> None:
        from cxrtool.train.feedback import standardised

        self.term.set_bank(cycle.positions, np.where(cycle.valid[:, None], standardised(cycle.features, cycle.valid), np.nan),
                           total)

    def record(self, cycles: list[dict[str, Any]], unlabelled: int) -> dict[str, Any]:
        from cxrtool.train.feedback import EXTRACTOR_SETTINGS, FINDING_CHOICE, REGION_RULE, feature_names

        config = self.config
        return {"every_epochs": config.feedback_every, "fraction_per_cycle": config.feedback_fraction,
                "map": {"method": config.feedback_cam, "layer": config.feedback_layer or "the method's default"},
                "region_rule": REGION_RULE, "finding_choice": FINDING_CHOICE,
                "extractor": {"library": "pyradiomics", "settings": EXTRACTOR_SETTINGS, "features": len(feature_names()),
                              "input": "the model's 8-bit input square", "standardised": "training pool's mean and SD per cycle; NaN as 0"},
                "temperature": config.radiomics_temperature, "unlabelled_images": unlabelled, "cycles": cycles}


def _feedback_run(config, model, criterion, train_idx, targets, val_set, out: Path, device, say) -> _Feedback | None:
    """The run's feedback loop, when a loss term asks for one.

    Raises:
        ValueError: a map method the model cannot draw (before the first epoch, not at the
            first cycle).
    """
    from cxrtool.registry import ATTENTION_METHOD
    from cxrtool.train.feedback import FeedbackCache, FeedbackRun

    term = next((t for t in criterion.terms if getattr(t, "feedback", False)), None)
    if term is None:
        return None
    if config.feedback_cam == ATTENTION_METHOD and "attention" not in model.gives:
        raise ValueError(f"feedback_cam {ATTENTION_METHOD} needs a head with attention maps (decoder, lga); "
                         f"this run's head is {config.head!r}")
    positions = np.asarray(train_idx, dtype=np.int64)

    def square(row: int):
        values = val_set.input_square(row)
        return None if values is None else np.round(values * 255).astype(np.uint8)

    run = FeedbackRun(positions=positions, targets=np.asarray(targets)[positions], square=square,
                      to_input=lambda square: torch.from_numpy(normalise(square.astype(np.float32) / 255.0, val_set.prep)),
                      cache=FeedbackCache(out / "feedback"), method=config.feedback_cam,
                      layer=config.feedback_layer or None, fraction=config.feedback_fraction, seed=config.seed,
                      device=device, batch_size=max(config.batch_size, 64), workers=config.workers,
                      progress=lambda phase, done, total: say(TrainEvent("phase", step=done, steps=total, message=phase)))
    return _Feedback(run, term, config, say)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch on the device; images channels-last (faster convolutions)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def _text_side(config: TrainConfig, findings: list[str]) -> dict[str, Any]:
    """A dual-branch model's text side: the encoder, its width, each finding's prompts and
    their embedding pairs (``pairs``, for the model's buffer; the rest goes on the card).

    Raises:
        ValueError: the sentence encoder is not installed (its training needs it).
    """
    from cxrtool.models.text import ENCODER_DIM, ENCODER_NAME, TEXT_HINT, encoder_installed, prompt_pairs, training_prompts

    if not encoder_installed():
        raise ValueError(f"zero_shot: {TEXT_HINT}")
    prompts = training_prompts(findings, prompts=config.prompts or None, descriptions=config.descriptions or None)
    return {"encoder": ENCODER_NAME, "dim": ENCODER_DIM, "prompts": prompts, "pairs": prompt_pairs(prompts)}


def _epoch_order(n: int, seed: int, epoch: int, info: distributed.DistInfo, *,
                 targets: np.ndarray | None = None) -> list[int]:
    """This rank's positions for an epoch, identical however the run was resumed: a
    shuffle of all ``n``, or with ``targets`` (n, findings) class-aware sampling (Shen et
    al., 2016): ``n`` draws, each a finding chosen uniformly among those with positives,
    then one of its positive images. Rare findings are then seen as often as common ones;
    an image with no positive label is never drawn (give "No Finding"/"Normal" a column to
    keep normal films in training)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if targets is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        positives = [np.flatnonzero(column == 1) for column in np.asarray(targets).T]
        positives = [rows for rows in positives if len(rows)]
        if not positives:
            raise ValueError("class-aware sampling needs positive labels; the training split has none")
        classes = torch.randint(len(positives), (n,), generator=generator).tolist()
        picks = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        order = [int(positives[c][int(u * len(positives[c]))]) for c, u in zip(classes, picks, strict=True)]
    if info.enabled:
        padded = order + order[: (-len(order)) % info.world_size]  # equal shares per rank
        order = padded[info.rank :: info.world_size]
    return order


@torch.no_grad()
def _validate(model, val_set, val_idx, config, device, info, use_amp, amp_dtype):
    """Scores on the validation images, each rank taking a share, gathered on every rank."""
    model.eval()
    share = list(val_idx)[info.rank :: info.world_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, share),
        batch_size=config.batch_size,
        num_workers=config.workers,
        worker_init_fn=worker_init if config.workers else None,
    )
    scores = []
    with fork_safe_opencv():
        batches = iter(loader)
    for batch in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(batch["image"].to(device).contiguous(memory_format=torch.channels_last))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
    mine = np.concatenate(scores) if scores else np.zeros((0, len(model.findings)), dtype=np.float32)
    parts = distributed.gather_objects(info, (share, mine))
    index = {position: row for part_share, part_scores in parts for position, row in zip(part_share, part_scores, strict=True)}
    ordered = np.stack([index[i] for i in val_idx])
    return val_set.targets[list(val_idx)], ordered


@dataclass
class Parent:
    """The checkpoint a fine-tuning run starts from."""

    path: Path
    sha256: str
    card: ModelCard
    state: dict[str, torch.Tensor]
    kept: list[str] = field(default_factory=list)  # the findings whose head weights were taken

    def initialise(self, model: CXRClassifier) -> str:
        """The parent's backbone; with the same kind of head, its weights for each finding
        the parent has (new findings keep fresh ones); returns what was taken, to say."""
        backbone = {k[len("backbone."):]: v for k, v in self.state.items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(backbone, strict=True)
        if model.head.takes_weights_of(self.card.head, self.card.head_settings):
            head = {k[len("head."):]: v for k, v in self.state.items() if k.startswith("head.")}
            self.kept = model.head.inherit(head, self.card.findings)
            return f"from {self.card.name}: its backbone, and its {model.head.name} head for {len(self.kept)} findings"
        return (f"from {self.card.name}: its backbone only (its head is {self.card.head!r}, this run's "
                f"{model.head.name!r}: a fresh head)")

    def record(self, findings: list[str]) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "sha256": self.sha256, "name": self.card.name,
                "findings_kept": [f for f in findings if f in self.kept],
                "findings_new": [f for f in findings if f not in self.kept]}


def _parent(config: TrainConfig, say: Callable[[TrainEvent], None]) -> Parent:
    """The ``init`` checkpoint; its architecture, output stride and input become the run's."""
    from safetensors.torch import load_file

    from cxrtool.models.checkpoint import file_sha256, read_card

    path = Path(config.init)
    card = read_card(path)
    kept = {"architecture": card.architecture, "output_stride": card.output_stride, "padding": card.padding,
            "input_size": int(card.preprocessing.get("input_size", config.input_size))}
    changed = [f"{key} {getattr(config, key)} -> {value}" for key, value in kept.items() if getattr(config, key) != value]
    for key, value in kept.items():
        setattr(config, key, value)
    say(TrainEvent("message", message=f"fine-tuning {card.name} ({path}): its backbone, input and preprocessing"
                   + (f" ({'; '.join(changed)})" if changed else "")))
    return Parent(path, file_sha256(path), card, load_file(str(path), device="cpu"))


def _card(config, findings, prep, table, train_idx, val_idx, val_targets, val_scores, per_finding, auroc, epoch, history,
          parent=None, *, head_settings=None, priors=None, text=None, optimiser=None, feedback=None, precision=None):
    from cxrtool.evaluate.metrics import choose_thresholds

    thresholds = choose_thresholds(val_targets, val_scores, method=config.threshold_method)
    return ModelCard(
        architecture=config.architecture,
        output_stride=config.output_stride,
        padding=config.padding,
        head=config.head,
        head_settings=dict(head_settings or {}),
        findings=list(findings),
        preprocessing=prep.to_dict(),
        name=config.name or Path(config.out).name,
        thresholds={f: round(float(t), 6) for f, t in zip(findings, thresholds, strict=True)},
        threshold_method=config.threshold_method,
        text=dict(text or {}),
        training={
            "labels": str(config.labels),
            "labels_format": table.source,
            "task": config.task,
            **({"projections": list(config.projections)} if config.projections else {}),
            "n_images": len(table),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "skipped_rows": table.skipped,
            "positives_train": {f: int(np.nansum(table.targets[train_idx, j])) for j, f in enumerate(findings)},
            "loss": config.loss,
            **({"preset": config.preset} if config.preset else {}),
            **({"sampling": config.sampling} if config.sampling != "uniform" else {}),
            **({"logit_adjustment": config.logit_adjustment} if config.logit_adjustment else {}),
            "epochs": config.epochs,
            "best_epoch": epoch,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "precision": precision_name(precision),
            **({"optimiser": optimiser} if optimiser else {}),
            "seed": config.seed,
            "pretrained": config.pretrained,
            **({"init": parent.record(list(findings))} if parent is not None else {}),
            **({"priors": priors} if priors else {}),
            **({"feedback": feedback} if feedback else {}),
        },
        metrics={
            "val_mean_auroc": None if math.isnan(auroc) else round(auroc, 6),
            "val_auroc": {f: (None if math.isnan(v) else round(v, 6)) for f, v in zip(findings, per_finding, strict=True)},
            "history": history,
        },
    )
