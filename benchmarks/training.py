"""`python -m benchmarks.training`: one optimiser step (forward, backward, clip, AdamW step) per method.

Methods (same backbone, same number of classes):
    reference_fpt[_preloaded]   fpt_fast.reference on an FPT's weights (N x N attention, sort)
    fpt[_preloaded]             fpt_fast FPT preset; _preloaded = features extracted beforehand and
    fpt+[_preloaded]            fpt_fast FPT+ preset         the frozen backbone moved off the device
    full_ft                     the timm backbone itself, every parameter trainable
    lora                        LoRA through peft on the qkv projections (+ the head); benchmark only
On CUDA: step time (median of timed steps), images/s, peak memory (max_memory_allocated), with a
batch sweep that stops at the first out-of-memory. Always (unless --no-accounting): a
device-independent memory account computed on the CPU (see ``account``), at --account-res and
--account-batch, extrapolated linearly from small measured batches.
PPE / PME (docs/method.md, section 8) are added to the rows when --auc is given.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpt_fast import FPT, FPTConfig, reference
from fpt_fast.app.metrics import pme, ppe
from fpt_fast.model import resize_images

from . import common

METHODS = ("reference_fpt", "reference_fpt_preloaded", "fpt", "fpt_preloaded", "fpt+", "fpt+_preloaded",
           "full_ft", "lora")
# name -> (timm model, label, backbone_kwargs)
BACKBONES = {
    "vit_b16": ("vit_base_patch16_384", "ViT-B/16", {}),
    "vit_l16": ("vit_large_patch16_384", "ViT-L/16", {}),
    "tiny": ("vit_tiny_patch16_224", "ViT-Ti/16(depth=2)", {"depth": 2}),
}
NUM_CLASSES = 5


def preset_of(method: str) -> str:
    return "fpt+" if method.startswith("fpt+") else "fpt"


def base_method(method: str) -> str:
    """The method whose score (AUC) applies: preloading and the reference change no predictions."""
    name = method.replace("_preloaded", "")
    return "fpt" if name == "reference_fpt" else name


# ------------------------------------------------------------------------------ method setups
class Setup:
    """A method's model and trainable parameters on a device, and a forward over a prepared batch.

    prepare(batch) makes the batch (images, or preloaded features) and returns the forward closure;
    resident() lists the parameters that must sit on the device during a step.
    """

    def __init__(self, method: str, spec: tuple, res: int, device, autocast_dtype, lora_rank: int = 16,
                 fusion_backend: str = "auto", side_size: Optional[int] = None, frozen_dtype: Optional[str] = None,
                 feature_dtype: Optional[str] = None):
        self.method, self.res, self.device = method, res, torch.device(device)
        self.autocast_dtype = autocast_dtype
        name, self.label, kwargs = spec
        self.preloaded = method.endswith("_preloaded")
        self.is_fpt = "fpt" in method
        self.inputs: List[Tensor] = []
        with torch.device(self.device):
            if self.is_fpt:
                self.config = FPTConfig.preset(preset_of(method), backbone=name, backbone_kwargs=dict(kwargs),
                                               image_size=res, num_classes=NUM_CLASSES,
                                               frozen_dtype=frozen_dtype, feature_dtype=feature_dtype,
                                               **({} if side_size is None else {"side_input_size": side_size}))
                self.model = FPT(self.config)
                # Only the fusion's prompt attention is pinned; the frozen branch keeps "auto".
                self.model.fusion.backend = fusion_backend
                self.trainable = list(self.model.trainable_parameters())
                self.learnable_share = self.model.learnable_share()
            else:
                import timm

                self.model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=res,
                                               **kwargs)
                if method == "lora":
                    self.model = _apply_lora(self.model, lora_rank)
                self.trainable = [p for p in self.model.parameters() if p.requires_grad]
                total = sum(p.numel() for p in self.model.parameters())
                self.learnable_share = sum(p.numel() for p in self.trainable) / total
        self.model.train()
        if self.is_fpt and self.preloaded and self.device.type == "cuda":
            self.model.frozen.to("cpu")  # preloading: the frozen backbone need not be on the device

    def resident(self) -> List[Tensor]:
        if self.is_fpt and self.preloaded:
            return list(self.trainable)
        return list(self.model.parameters())

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def extract(self, x_hi: Tensor):
        """Preloaded features of this batch, computed the way the method's pipeline stores them."""
        frozen = self.model.frozen
        if self.device.type == "cuda":
            frozen.to(self.device)
        try:
            with torch.no_grad(), self._autocast():
                if self.method.startswith("reference"):
                    keys, values = reference.extract_features(frozen.backbone, x_hi, self.config.layers,
                                                              self.config.num_selected, self.config.importance)
                    return keys.float(), values.float()  # the official code stores fp32 features
                feats = self.model.extract(x_hi)
                return feats.keys, feats.values
        finally:
            if self.device.type == "cuda":
                frozen.to("cpu")

    def prepare(self, batch: int, gen: torch.Generator) -> Callable[[], Tensor]:
        d = self.device
        x_hi = torch.randn(batch, 3, self.res, self.res, device=d, generator=gen)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), device=d, generator=gen)
        model = self.model
        if not self.is_fpt:
            self.inputs = [x_hi]
            return lambda: model(x_hi)
        x_lo = resize_images(x_hi, self.config.side_input_size)
        if self.preloaded:
            keys, values = self.extract(x_hi)
            del x_hi
            self.inputs = [x_lo, keys, values]
            if self.method.startswith("reference"):
                return lambda: reference.side_forward(model.side, x_lo,
                                                      reference.fusion_forward(model.fusion, keys, values))
            from fpt_fast import FrozenFeatures

            feats = FrozenFeatures(keys, values)
            return lambda: model.forward_from_features(x_lo, feats)
        self.inputs = [x_hi, x_lo]
        if self.method.startswith("reference"):
            return lambda: reference.fpt_forward(model, x_hi, x_lo)
        return lambda: model(x_hi, x_lo)

    def frozen_forward(self) -> Optional[Callable[[], object]]:
        """The no-grad frozen-branch call an online step makes (None for the other methods)."""
        if not self.is_fpt or self.preloaded:
            return None
        x_hi = self.inputs[0]
        if self.method.startswith("reference"):
            bb, cfg = self.model.frozen.backbone, self.config
            return lambda: reference.extract_features(bb, x_hi, cfg.layers, cfg.num_selected, cfg.importance)
        return lambda: self.model.extract(x_hi)

    def step_fn(self, forward: Callable[[], Tensor], opt) -> Callable[[], None]:
        def step():
            opt.zero_grad(set_to_none=True)
            with self._autocast():
                logits = forward()
            loss = F.cross_entropy(logits.float(), self.labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)  # the official recipe clips at 1.0
            opt.step()
        return step


def _apply_lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # ImportError is reported by the caller

    # qkv of every block, as LoRA for ViTs usually does; the new head trains in full.
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], lora_dropout=0.0,
                        modules_to_save=["head"])
    return get_peft_model(model, config)


def unavailable_reason(method: str) -> Optional[str]:
    if method == "lora":
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            return "peft not installed (pip install peft); LoRA is a benchmark-only comparison"
    return None


def make_optimizer(params: Sequence[nn.Parameter]):
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.05)


def _nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(opt) -> int:
    return _nbytes(t for state in opt.state.values() for t in state.values() if isinstance(t, Tensor))


# ------------------------------------------------------------------------- efficiency metrics
def parse_auc(text: Optional[str]) -> Dict[str, float]:
    """'87.1' (every method) or 'fpt=86.4,fpt+=87.12,full_ft=88.82,lora=85.94'."""
    if not text:
        return {}
    if "=" not in text:
        return {m: float(text) for m in ("fpt", "fpt+", "full_ft", "lora")}
    return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}


def add_efficiency(rows: List[dict], auc: Dict[str, float], memory_field: str) -> None:
    """PPE and PME per row, PME against full fine-tuning's row at the same shape."""
    full = {r["shape"]: r.get(memory_field) for r in rows if r["provider"] == "full_ft" and r["status"] == "ok"}
    for r in rows:
        score = auc.get(base_method(r["provider"]))
        if score is None or r["status"] != "ok":
            continue
        r["auc"] = score
        if r.get("learnable_share") is not None:
            r["ppe"] = ppe(score, r["learnable_share"])
        m, m_full = r.get(memory_field), full.get(r["shape"])
        if m and m_full:
            r["pme"] = pme(score, m, m_full)


# ------------------------------------------------------------------------- GPU step benchmark
def bench_steps(args, device, budget: common.Budget, gen, saver: Optional[common.Saver] = None) -> List[dict]:
    label = common.device_label(device)
    autocast = torch.bfloat16 if (device.type == "cuda" and args.precision == "bf16") else None
    dtype_text = "bf16-autocast" if autocast else "float32"
    rows = []
    for bb in args.backbones:
        spec = BACKBONES[bb]
        for res in args.resolutions:
            for method in args.methods:
                new = _sweep_batches(args, device, budget, gen, spec, res, method, autocast, dtype_text, label)
                rows += new
                add_efficiency(rows, args.auc, "peak_mb")
                add_reference_ratios(rows)
                if saver is not None:
                    saver.add(new)  # written as it goes: a hard stop keeps what was measured
    return rows


def add_reference_ratios(rows: List[dict]) -> None:
    """speedup_vs_reference and memory_vs_reference of each measured step against the reference FPT's
    at the same shape (reference_fpt_preloaded for the preloaded methods), same run."""
    refs = {(r["provider"], r["shape"]): r for r in rows if r["provider"].startswith("reference") and r["status"] == "ok"}
    for r in rows:
        ref = refs.get(("reference_fpt_preloaded" if r["provider"].endswith("_preloaded") else "reference_fpt",
                        r["shape"]))
        if ref is None or r["status"] != "ok":
            continue
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
        if ref.get("peak_mb") and r.get("peak_mb") is not None:
            r["memory_vs_reference"] = r["peak_mb"] / ref["peak_mb"]


def _sweep_batches(args, device, budget, gen, spec, res, method, autocast, dtype_text, label) -> List[dict]:
    rows = []

    def record(batch, **fields):
        r = common.row("train_step", method, "fwd+bwd+step", f"{spec[1]}@{res} B={batch}", dtype_text, label,
                       params=dict(model=spec[1], resolution=res, batch=batch, method=method))
        r.update(fields)
        rows.append(r)
        return r

    reason = unavailable_reason(method) or (budget.reason if budget.expired() else None)
    if reason:
        for b in args.batches:
            record(b, status="skipped", reason=reason)
        return rows
    setup = opt = None
    try:
        setup = Setup(method, spec, res, device, autocast, args.lora_rank, side_size=args.side_size,
                      feature_dtype=args.feature_dtype)
        opt = make_optimizer(setup.trainable)
    except Exception as exc:
        failure = common.failure_fields(exc)
        del exc
        for b in args.batches:
            record(b, status=failure["status"], reason=f"building the model failed: {failure['reason']}")
        return rows
    stop_reason = None
    for batch in args.batches:
        if stop_reason is None and budget.expired():
            stop_reason = budget.reason
        if stop_reason is not None:
            record(batch, status="skipped", reason=stop_reason)
            continue
        common.clear(device)
        failure = None
        try:
            forward = setup.prepare(batch, gen)
            step = setup.step_fn(forward, opt)
            if device.type == "cuda":
                # After prepare: preloading's extraction is offline work, not part of the step's peak;
                # the batch itself (already allocated) stays in the peak.
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = common.step_times_ms(step, device, warmup=args.warmup_steps, reps=args.steps)
        except Exception as exc:
            failure = common.failure_fields(exc)
            del exc
        if failure is not None:
            opt.zero_grad(set_to_none=True)
            setup.inputs = []
            forward = step = None
            common.clear(device)
            record(batch, **failure)
            stop_reason = f"a smaller batch failed ({failure['status']})"
            continue
        ms = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated(device) / common.MB if device.type == "cuda" else None
        record(batch, median_ms=ms, images_per_s=batch / (ms * 1e-3), peak_mb=peak,
               learnable_share=setup.learnable_share, step_times_ms=times,
               trainable_params=sum(p.numel() for p in setup.trainable))
        setup.inputs = []
        forward = step = None
        if ms * 1e-3 * (args.warmup_steps + args.steps) * 2.2 > (args.budget_s or math.inf) - budget.elapsed():
            stop_reason = "the next batch would not fit in the remaining time budget"
    del setup, opt
    common.clear(device)
    return rows


# ----------------------------------------------------------------- device-independent account
def account(method: str, spec: tuple, res: int, batches: Sequence[int], target_batch: int,
            device="cpu", seed: int = 0, lora_rank: int = 16, fusion_backend: str = "auto",
            side_size: Optional[int] = None, feature_dtype: Optional[str] = None) -> dict:
    """Memory of one training step that does not depend on the GPU or its allocator, in bytes.

    saved: tensors autograd keeps for backward (saved_tensors_hooks; unique storages; parameters and
        the batch's inputs excluded), measured at each of ``batches`` and extrapolated linearly
        (exact for these models: every saved tensor is batch-proportional or batch-independent).
    resident params: parameters that must sit on the device during a step (the frozen backbone too,
        unless features are preloaded). grads: the trainable parameters'. optimizer: AdamW's state,
        read from the optimiser after a step. inputs: the batch (images, or preloaded features).
    frozen transient: peak of the tensors alive during the online step's no-grad frozen forward
        (LiveBytes; its output features included), 0 for the other methods.
    estimate = params + grads + optimizer + inputs + max(saved, frozen transient): the two phases of a
        step do not overlap (the frozen branch finishes before the trainable forward starts).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    # fp32 everywhere, the frozen branch included (it defaults to bf16 on GPUs): the same figures
    # whichever device computes them.
    setup = Setup(method, spec, res, device, None, lora_rank, fusion_backend, side_size, frozen_dtype="float32",
                  feature_dtype=feature_dtype)
    measured = {}
    for b in batches:
        forward = setup.prepare(b, gen)
        exclude = list(setup.model.parameters()) + list(setup.inputs)
        with common.SavedBytes(exclude) as saved:
            logits = forward()
        del logits
        frozen_peak = 0
        frozen = setup.frozen_forward()
        if frozen is not None:
            with torch.no_grad(), common.LiveBytes() as live:
                out = frozen()
                del out
            frozen_peak = live.peak
        measured[b] = dict(saved=saved.nbytes, inputs=_nbytes(setup.inputs), frozen=frozen_peak)
        setup.inputs = []

    def at(key: str, batch: int) -> float:
        if len(batches) == 1:
            return measured[batches[0]][key] * batch / batches[0]
        b0, b1 = batches[0], batches[-1]
        slope = (measured[b1][key] - measured[b0][key]) / (b1 - b0)
        return measured[b0][key] + slope * (batch - b0)

    opt = make_optimizer(setup.trainable)
    for p in setup.trainable:  # one step on zero gradients creates the full optimiser state cheaply
        p.grad = torch.zeros_like(p)
    opt.step()
    trainable_bytes = _nbytes(setup.trainable)
    resident_bytes = _nbytes(setup.resident())
    figures = dict(
        saved_bytes=at("saved", target_batch), input_bytes=at("inputs", target_batch),
        frozen_transient_bytes=at("frozen", target_batch),
        param_bytes=resident_bytes, trainable_param_bytes=trainable_bytes, grad_bytes=trainable_bytes,
        optimizer_bytes=optimizer_state_bytes(opt), learnable_share=setup.learnable_share,
        trainable_params=sum(p.numel() for p in setup.trainable),
        measured_batches=list(batches), measured={str(b): v for b, v in measured.items()},
        extrapolated=target_batch not in batches,
    )
    static = figures["param_bytes"] + figures["grad_bytes"] + figures["optimizer_bytes"]
    figures["static_bytes"] = static
    figures["persistent_bytes"] = static + figures["input_bytes"] + figures["saved_bytes"]
    figures["estimate_bytes"] = static + figures["input_bytes"] + max(figures["saved_bytes"],
                                                                      figures["frozen_transient_bytes"])
    return figures


def account_op_backend(requested: str, device) -> str:
    """The fusion's prompt_attention backend for the account: the one a GPU step runs (Triton) where
    it can run here (on the CPU only under TRITON_INTERPRET=1), else the "torch" backend, whose
    CPU SDPA saves the P x n probabilities and a transposed copy of the keys."""
    from fpt_fast import ops

    if requested != "auto":
        return requested
    probe = ops.unsupported_reasons("triton", "prompt_attention", device)
    return "torch" if probe else "triton"


def accounting_rows(args, budget: common.Budget) -> List[dict]:
    rows = []
    spec = BACKBONES[args.account_backbone]
    device = torch.device(args.account_device)
    shape = f"{spec[1]}@{args.account_res} B={args.account_batch}"
    label = f"{common.device_label(device)} (device-independent)"
    fusion_backend = account_op_backend(args.account_op_backend, device)
    for method in args.methods:
        dtype_text = "float32" if args.feature_dtype in (None, "float32") else f"float32 (features {args.feature_dtype})"
        r = common.row("train_memory", method, "accounting", shape, dtype_text, label,
                       params=dict(model=spec[1], resolution=args.account_res, batch=args.account_batch,
                                   method=method))
        if "fpt" in method and not method.startswith("reference"):
            r.update(fusion_backend=fusion_backend, feature_dtype=args.feature_dtype or "float32")
            if not method.endswith("_preloaded"):
                from fpt_fast import ops

                # What the online step's frozen branch ran here ("auto" differs between devices).
                r["frozen_attention"] = ops.auto_choices(device)["attention_with_importance"]
        reason = unavailable_reason(method) or (budget.reason if budget.expired() else None)
        if reason:
            r.update(status="skipped", reason=reason)
            rows.append(r)
            continue
        try:
            r.update(account(method, spec, args.account_res, args.account_batches, args.account_batch,
                             device=device, seed=args.seed, lora_rank=args.lora_rank, fusion_backend=fusion_backend,
                             side_size=args.side_size, feature_dtype=args.feature_dtype))
        except Exception as exc:  # one method failing must not lose the others' figures
            r.update(common.failure_fields(exc))
        rows.append(r)
        common.clear(device)
    full = common.ok_row(rows, "full_ft")
    for r in rows if full is not None else ():
        if r["status"] == "ok":
            for ratio, figure in (("ratio_vs_full_ft", "estimate_bytes"), ("saved_ratio_vs_full_ft", "saved_bytes"),
                                  ("persistent_ratio_vs_full_ft", "persistent_bytes")):
                r[ratio] = r[figure] / full[figure]
    add_efficiency(rows, args.auc, "estimate_bytes")
    return rows


# --------------------------------------------------------------------------------- main
def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", type=common.str_list, default=list(METHODS))
    p.add_argument("--backbones", type=common.str_list, default=None,
                   help=f"comma-separated of {sorted(BACKBONES)} (default vit_b16; tiny in --smoke)")
    p.add_argument("--resolutions", type=common.int_list, default=None, help="default 224,512,1024,2048")
    p.add_argument("--batches", type=common.int_list, default=None,
                   help="batch sweep, stops at the first OOM (default 1,2,4,8,16,32,64)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="CUDA steps under bf16 autocast (default) or in fp32; the CPU always runs fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per point")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--feature-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="storage dtype of fpt_fast's selected keys/values (default: FPTConfig's, i.e. the "
                        "frozen compute dtype: bf16 on GPUs, fp32 in the account)")
    p.add_argument("--side-size", type=int, default=None,
                   help="side-network input size (default: the preset's, 224 FPT / 128 FPT+; 32 in --smoke)")
    p.add_argument("--auc", default=None,
                   help="score for PPE/PME: one number, or per method 'fpt=86.4,fpt+=87.12,full_ft=88.82'")
    p.add_argument("--no-steps", action="store_true", help="only the CPU memory account")
    p.add_argument("--no-accounting", action="store_true", help="skip the CPU memory account")
    p.add_argument("--account-backbone", default=None, help="default vit_b16 (tiny in --smoke)")
    p.add_argument("--account-res", type=int, default=None, help="default 512")
    p.add_argument("--account-batch", type=int, default=16, help="batch the figures are given at")
    p.add_argument("--account-batches", type=common.int_list, default=None,
                   help="batches actually run on the CPU, extrapolated linearly (default 1,2)")
    p.add_argument("--account-device", default="cpu",
                   help="where the account runs (cpu default; cuda gives the same figures, faster)")
    p.add_argument("--account-op-backend", default="auto",
                   help="fusion backend in the account: auto = triton where it runs (CPU: under "
                        "TRITON_INTERPRET=1), else torch")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbones = args.backbones or ["tiny"]
        args.resolutions = args.resolutions or [64]
        args.batches = args.batches or [1, 2]
        args.side_size = args.side_size or 32
        args.steps, args.warmup_steps = min(args.steps, 2), min(args.warmup_steps, 1)
        args.account_backbone = args.account_backbone or "tiny"
        args.account_res = args.account_res or 128
        args.account_batch = 4 if args.account_batch == 16 else args.account_batch
    args.backbones = args.backbones or ["vit_b16"]
    args.resolutions = args.resolutions or [224, 512, 1024, 2048]
    args.batches = args.batches or [1, 2, 4, 8, 16, 32, 64]
    args.account_backbone = args.account_backbone or "vit_b16"
    args.account_res = args.account_res or 512
    args.account_batches = args.account_batches or [1, 2]
    args.auc = parse_auc(args.auc)
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected some of {METHODS}")
    for b in args.backbones + [args.account_backbone]:
        if b not in BACKBONES:
            p.error(f"unknown backbone {b!r}; expected one of {sorted(BACKBONES)}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "training")
    if not args.no_accounting:
        saver.add(accounting_rows(args, budget))
        print(accounting_summary(saver.rows))
    if not args.no_steps:
        step_rows = bench_steps(args, device, budget, gen, saver)
        saver.add(step_rows)  # again, now with PME against full fine-tuning filled in everywhere
        print(steps_summary(step_rows))
    path = saver.add([])
    print(f"wrote {len(saver.rows)} rows to {path}")
    return saver.rows


def accounting_summary(rows: List[dict]) -> str:
    acc = [r for r in rows if r["op"] == "train_memory"]
    if not acc:
        return ""
    backend = next((r.get("fusion_backend") for r in acc if r.get("fusion_backend")), "-")
    lines = [f"device-independent memory per step at {acc[0]['shape']} (MiB; fp32; computed on "
             f"{acc[0]['device']}; fpt_fast fusion backend: {backend}):",
             f"{'method':<24} {'saved':>9} {'params':>9} {'grads':>8} {'adamw':>8} {'inputs':>8} "
             f"{'frozen':>8} {'estimate':>9} {'vs full':>8}"]
    for r in acc:
        if r["status"] != "ok":
            lines.append(f"{r['provider']:<24} {r['status']}: {r['reason']}")
            continue
        ratio = r.get("ratio_vs_full_ft")
        lines.append(f"{r['provider']:<24} {r['saved_bytes'] / common.MB:>9.1f} {r['param_bytes'] / common.MB:>9.1f} "
                     f"{r['grad_bytes'] / common.MB:>8.1f} {r['optimizer_bytes'] / common.MB:>8.1f} "
                     f"{r['input_bytes'] / common.MB:>8.1f} {r['frozen_transient_bytes'] / common.MB:>8.1f} "
                     f"{r['estimate_bytes'] / common.MB:>9.1f} "
                     f"{'-' if ratio is None else f'{100 * ratio:.2f}%':>8}")
    return "\n".join(lines)


def steps_summary(rows: List[dict]) -> str:
    return common.text_table(rows, [
        ("method", "<24", lambda r: r["provider"]), ("shape", "<22", lambda r: r["shape"]),
        ("ms", ">9", lambda r: common.fmt(r["median_ms"], ".1f")),
        ("img/s", ">9", lambda r: common.fmt(r.get("images_per_s"), ".1f")),
        ("peak MB", ">9", lambda r: common.fmt(r.get("peak_mb"), ".0f"))])


if __name__ == "__main__":
    main()
