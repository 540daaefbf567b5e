"""Checkpoint files: reading and writing them safely, and rebuilding the network a checkpoint holds.

A run folder models/<run>/ holds ckpt.pt, ema_ckpt.pt and optim.pt (plain state_dicts of CPU tensors, as the
original wrote them), state.pt (the rest that resuming needs: epoch, step, EMA counter, scaler, RNG states; and
the precision the run last trained in) and config.json (the run's settings, config.RunConfig). A --clusters run
of ddpm.py keeps ckpt.pt and ema_ckpt.pt in UNet's layout, as every ddpm.py run, and its clusters' label
embedding in clusters.pt beside them.
The original's bare checkpoints, with no config beside them, are read by their tensor shapes. --overwrite
replaces a run's files only once the new run saves.
"""
import copy
import dataclasses
import json
import os
import random
from collections import OrderedDict

import numpy as np
import torch

from config import LEGACY, PRESETS, RunConfig
from modules import CHECKPOINT_INFO, network_of, unwrap
from utils import UserError

GUIDE_FILE = "guide_ckpt.pt"  # the run's autoguidance guide (config.guide_at), a plain state_dict
# a --clusters run's label embedding, left out of ckpt.pt and ema_ckpt.pt so that UNet() loads them:
# {"ckpt.pt": {"label_emb.weight": ...}, "ema_ckpt.pt": {...}}
CLUSTER_FILE = "clusters.pt"
RUN_FILES = ("ckpt.pt", "ema_ckpt.pt", "optim.pt", "state.pt", "config.json", GUIDE_FILE, CLUSTER_FILE)


def atomic_save(obj, path):
    """torch.save (JSON for .json) through a temporary file, fsync and os.replace: a crash mid-save leaves the
    old file."""
    atomic_save_all([(obj, path)])


def atomic_save_all(items):
    """atomic_save for several (obj, path) as one: every file is written and flushed beside its path first,
    then all are renamed into place, so a crash while writing leaves the old set whole (only the renames,
    microseconds, could leave a mix)."""
    staged = []
    try:
        for obj, path in items:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            staged.append((f"{path}.tmp{os.getpid()}", path))
            with open(staged[-1][0], "wb") as f:
                if path.endswith(".json"):
                    f.write((json.dumps(obj, indent=2) + "\n").encode())
                else:
                    torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path):
    """torch.load with weights_only=True (no pickled code runs), onto the CPU."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (older versions: a pickle)
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint: pass a ckpt.pt or ema_ckpt.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint {path} holds pickled objects, refused for safety: save a plain "
                            "state_dict, or load it yourself only if you trust its source") from None
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): is it complete?") from None


def with_metadata(tensors, like):
    """`tensors` (a dict) as a state_dict with the metadata of the state_dict `like` (modules.CHECKPOINT_INFO:
    what the weights are), which a plain dict would drop."""
    out = OrderedDict(tensors)
    out._metadata = copy.deepcopy(getattr(like, "_metadata", OrderedDict()))
    return out


def cpu_state_dict(module):
    """A state_dict of contiguous CPU tensors (also from a channels_last model) without wrapper prefixes,
    loadable anywhere without map_location, with its metadata."""
    sd = unwrap(module).state_dict()
    return with_metadata({k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                          for k, v in sd.items()}, sd)


def without_prefix(key):
    while key.startswith(("module.", "_orig_mod.")) or key in ("module", "_orig_mod"):
        key = key.partition(".")[2]
    return key


def strip_prefixes(state_dict):
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes some checkpoints carry, from the
    keys and their metadata's."""
    out = with_metadata({without_prefix(k): v for k, v in state_dict.items()}, {})
    out._metadata.update((without_prefix(k), v) for k, v in getattr(state_dict, "_metadata", {}).items())
    return out


def load_weights(model, state_dict, source="checkpoint", record=None):
    """load_state_dict(strict=True) that explains a mismatch in one line instead of a page of keys. `record`:
    the run's own modules.UNet.trained_with, kept where the weights were saved before checkpoints said it."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        hints = []
        if "label_emb.weight" in missing:
            hints.append("the checkpoint is unconditional: use UNet / ddpm.py")
        if "label_emb.weight" in unexpected:
            hints.append("the checkpoint is class-conditional: use UNet_conditional / ddpm_conditional.py")
        if "label_emb.weight" in wrong:
            hints.append(f"--num-classes should be {state_dict['label_emb.weight'].shape[0]}")
        if "inc.double_conv.0.weight" in wrong:
            w = state_dict["inc.double_conv.0.weight"].shape
            hints.append(f"the checkpoint has base width {w[0]} and {w[1]} input channels")
        if not hints:
            hints.append("check --channels, --base-width and --num-classes")
        detail = "; ".join(f"{name}: {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}" for name, ks in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if ks)
        raise UserError(f"{source} does not fit the network ({detail}): {'; '.join(hints)}")
    model.load_state_dict(state_dict, strict=True)
    if record and not model.trained_with:
        model.trained_with = record
    return model


# ---- a run's config.json ----------------------------------------------------------------------------------

def save_config(config, run_dir):
    atomic_save(config.to_json(), os.path.join(run_dir, "config.json"))


def load_config(run_dir):
    """The RunConfig of the run in `run_dir`: its config.json, or an earlier version's state.pt; None if neither."""
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return RunConfig.from_json(json.load(f), path)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path} cannot be read ({e}): restore it, or delete it to fall back to defaults")
    legacy = os.path.join(run_dir, "state.pt")
    if os.path.isfile(legacy):
        state = load_checkpoint(legacy)
        args = state.get("args") if isinstance(state, dict) else None
        if isinstance(args, dict):
            known = {f.name for f in dataclasses.fields(RunConfig)}
            return RunConfig(**{**LEGACY, **{k: v for k, v in args.items() if k in known}})
    return None


# ---- a training run's files ---------------------------------------------------------------------------

def save_run(run_dir, model, ema_model, optimizer, state, config):
    """ckpt.pt, ema_ckpt.pt and optim.pt as the original's plain state_dicts, config.json, then state.pt (the
    rest that resuming needs), replaced as one set: a run killed while saving resumes from its last whole save."""
    for p in unwrap(model).parameters():
        if not torch.isfinite(p).all():
            raise UserError("the weights became non-finite; nothing was saved over the last good checkpoint: "
                            "lower --lr, or resume from the last save with --resume")
    files = [("ckpt.pt", cpu_state_dict(model))]
    if ema_model is not None:
        files.append(("ema_ckpt.pt", cpu_state_dict(ema_model)))
    if config.clusters:  # a ddpm.py run: its checkpoints stay UNet's, loadable by UNet().load_state_dict
        files.append((CLUSTER_FILE, {name: {"label_emb.weight": sd.pop("label_emb.weight")} for name, sd in files}))
        for _, sd in files[:-1]:  # and say so
            sd._metadata[""][CHECKPOINT_INFO].update(zip(("network", "args"), network_of(sd)))
    files += [("optim.pt", optimizer.state_dict()), ("config.json", config.to_json()), ("state.pt", state)]
    atomic_save_all([(obj, os.path.join(run_dir, name)) for name, obj in files])


def load_run(run_dir, model, ema_model, optimizer):
    """Load what save_run wrote into the given objects; returns state.pt's dict."""
    for name, m in (("ckpt.pt", model), ("ema_ckpt.pt", ema_model)):
        if m is not None:
            path = os.path.join(run_dir, name)
            load_weights(m, with_clusters(load_checkpoint(path), path), path, record=m.trained_with)
    optimizer.load_state_dict(load_checkpoint(os.path.join(run_dir, "optim.pt")))
    return load_checkpoint(os.path.join(run_dir, "state.pt"))


def with_clusters(sd, path):
    """A checkpoint's state_dict with the label embedding that clusters.pt beside it keeps for it, if any (runs
    saved before clusters.pt existed hold it in the checkpoint itself)."""
    extra = os.path.join(os.path.dirname(os.path.abspath(path)), CLUSTER_FILE)
    if "label_emb.weight" in sd or not os.path.isfile(extra):
        return sd
    return with_metadata({**sd, **load_checkpoint(extra).get(os.path.basename(path), {})}, sd)


# ---- resuming exactly

def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy arrays would need pickle: store a tensor
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, gauss), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def match_state_layout(optimizer):
    """Give each optimizer state tensor its parameter's memory layout. A run saved from a channels_last model
    resumed in NCHW (or the reverse: another machine, see hardware.fast_memory_format) would otherwise feed
    fused AdamW tensors of different strides, and torch 2.14's CPU kernel then takes wrong steps without a word."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)



# ---- the network a checkpoint holds ---------------------------------------------------------------------

def resolve_ckpt(path):
    """A checkpoint file, or a run folder (models/<run>/): its EMA weights when it has them."""
    if os.path.isdir(path):
        for name in ("ema_ckpt.pt", "ckpt.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"--ckpt {path}: the folder holds no ema_ckpt.pt or ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"--ckpt {path}: no such file")
    return path


def config_from_weights(sd, ckpt):
    """For a bare checkpoint (the original's): a RunConfig whose network fits the weights' shapes, with the
    original's prediction target (eps) and guidance scale; image size and sampler take the defaults."""
    network = network_of(sd)
    if network is None:
        raise UserError(f"--ckpt {ckpt}: not a UNet checkpoint of this project (no inc/down1/outc weights)")
    name, args = network
    shape = {"conditional": name == "UNet_conditional", "channels": args["c_in"], "base_width": args["base_width"],
             "time_dim": args["time_dim"], "num_classes": args.get("num_classes", LEGACY["num_classes"])}
    return RunConfig(**{**LEGACY, "cfg_scale": PRESETS["original"]["cfg_scale"], **shape})


def load_model(ckpt, device="cpu"):
    """(the network in eval mode, its RunConfig): from the run's config.json beside the checkpoint when there
    is one, else from the weights' shapes (image size and the diffusion then take the defaults)."""
    sd = load_checkpoint(ckpt)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--ckpt {ckpt}: not a state_dict of a UNet (use ckpt.pt or ema_ckpt.pt of a run)")
    sd = with_clusters(strip_prefixes(sd), ckpt)
    saved = load_config(os.path.dirname(os.path.abspath(ckpt)))
    config = saved or config_from_weights(sd, ckpt)
    if config.clusters and "label_emb.weight" not in sd:
        raise UserError(f"--ckpt {ckpt}: a --clusters run's network, but {CLUSTER_FILE}, its clusters' embedding, "
                        "is not beside it: copy it from the run's folder")
    model = load_weights(config.make_model(), sd, ckpt, record=saved and saved.trained_with())
    return model.to(device).eval(), config


def old_run_outputs(c, resuming, overwrite):
    """What --overwrite replaces: another run's checkpoints, grids and TensorBoard files under this name, each
    with what tells that version of it apart (without --overwrite, an error). save() removes those the new
    run has not rewritten by its first save: a new run that fails before then leaves the old one whole."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join("models", c.run_name, f))]
    if found and not resuming and not overwrite:
        raise UserError(f"models/{c.run_name} already holds a run ({', '.join(found)}): pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --run-name")
    if resuming or not found:
        return {}
    folders = [os.path.join(top, c.run_name) for top in ("models", "results", "runs")]
    paths = [os.path.join(d, f) for d in folders if os.path.isdir(d) for f in os.listdir(d)]
    return {p: file_version(p) for p in paths if os.path.isfile(p)}


def file_version(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
