"""timm backbones from a name, a hub id or a local weights file (the one home of backbone
creation: the image encoder of the model and the frozen patch features of ``build-graphs``).

``name`` is any ``timm.list_models()`` name or a hub id ``hf-hub:<org>/<repo>`` (UNI,
Virchow, H-optimus, ... where the network or a filled Hugging Face cache is available).
``checkpoint_path`` loads a local state dict (``.pth`` / ``.bin`` / ``.safetensors``) into
the architecture ``name`` names, e.g. UNI's ``pytorch_model.bin`` with
``vit_large_patch16_224`` (its timm kwargs as published by the model's authors).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from tissuegraph.errors import ConfigError, InputError, one_line

__all__ = ["check_timm_name", "create_backbone"]


def check_timm_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` for a name timm does not know."""
    import timm

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"model.image_encoder.name={name!r} is not a timm model{hint} "
        "(see timm.list_models(), or use hf-hub:<org>/<repo>)"
    )


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """``timm.create_model(name, pretrained=..., num_classes=0, **model_kwargs)`` plus local
    weights.

    ``model_kwargs``: extra architecture arguments some published weights need (UNI:
    ``{"init_values": 1e-5, "dynamic_img_size": true}``).

    ``checkpoint_path`` is read with ``timm.models.load_state_dict`` (``.pth``/``.bin``/
    ``.safetensors``; ``state_dict``/``model`` wrappers are unwrapped); classifier weights are
    dropped, every other backbone weight must be present.
    """
    import timm

    check_timm_name(name)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, **dict(model_kwargs or {})
        )
    except Exception as exc:  # network, hub cache or bad kwargs
        msg = str(exc).strip().splitlines()
        raise InputError(
            f"cannot create timm model {name!r} (pretrained={pretrained}): "
            f"{msg[0][:200] if msg else type(exc).__name__}; without network set "
            "model.image_encoder.pretrained=false or give a local checkpoint_path"
        ) from exc
    if checkpoint_path:
        p = Path(checkpoint_path)
        if not p.is_file():
            raise InputError(f"model.image_encoder.checkpoint_path not found: {p}")
        try:
            state = timm.models.load_state_dict(str(p), use_ema=True, weights_only=True)
        except Exception as exc:
            raise InputError(
                f"cannot read image encoder weights {p}: {one_line(exc, limit=200)}"
            ) from exc
        clf = model.pretrained_cfg.get("classifier") or "fc"
        clf = [clf] if isinstance(clf, str) else list(clf)
        state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in clf)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise InputError(
                f"image encoder weights {p} do not fit timm model {name!r} "
                f"({str(exc).strip().splitlines()[-1].strip()[:160]})"
            ) from exc
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise InputError(
                f"image encoder weights {p} do not fit timm model {name!r} ({what}, "
                f"{len(missing)} missing / {len(unexpected)} unexpected keys)"
            )
    return model
