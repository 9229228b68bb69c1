"""What `tether agent backends` shows: the device profile, the backends that really run, the choices.

`describe(state_dir)` builds the document (`--json` prints it as is);
`table(doc)` renders it. Reads the agent's state directory and never writes it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tether.agent import backends, profile
from tether.common import manifest


def _models_by_key(state_dir: pathlib.Path) -> dict[str, list[dict[str, str]]]:
    """model key -> [{"release", "model"}] for the installed releases (empty when there is no state)."""
    found: dict[str, list[dict[str, str]]] = {}
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return found
    for release, installed in (state.get("installed") or {}).items():
        try:
            from tether.agent import bundles

            rdir = state_dir / "installs" / bundles.release_dirname(release)
            version = int(installed["version"])
            bundle = manifest.Manifest.from_bytes((rdir / f"{version}{bundles.MANIFEST_SUFFIX}").read_bytes())
        except Exception:
            continue
        for spec in backends.specs_for(bundle, path_of=lambda f: f.path):
            found.setdefault(spec.key, []).append({"release": release, "model": spec.name})
    return found


def describe(state_dir: str | pathlib.Path, *, device_profile: profile.DeviceProfile | None = None) -> dict[str, Any]:
    state_dir = pathlib.Path(state_dir)
    p = device_profile or profile.collect(measure=False)
    cache = backends.SelectionCache(state_dir / backends.CACHE_FILE)
    used = _models_by_key(state_dir)
    models = []
    for sel in sorted(cache.entries(), key=lambda s: -s.created_at):
        models.append(
            {
                "model_key": sel.model_key,
                "used_by": used.get(sel.model_key, []),
                "chosen": sel.chosen.key,
                "backend": sel.chosen.backend_name,
                "latency_ms": sel.latency_ms,
                "current": sel.fingerprint == p.fingerprint,  # measured on this device as it is now
                "selection_seconds": sel.seconds,
                "created_at": sel.created_at,
                "measurements": [m.to_json() for m in sel.measurements],
                "pruned": [x.to_json() for x in sel.pruned],
            }
        )
    return {
        "backends": list(p.backends),
        "fingerprint": p.fingerprint,
        "profile": p.to_json(),
        "models": models,
    }


def table(doc: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    prof = doc["profile"]
    info = Table.grid(padding=(0, 2))
    info.add_row("cpu", f"{prof['cpu_model']} ({prof['arch']}, {prof['cores']} cores)")
    info.add_row("simd", " ".join(prof["simd"]) or "-")
    info.add_row("memory", f"{prof['memory_mb']} MiB")
    info.add_row("gpus", ", ".join(prof["gpus"]) or "none")
    info.add_row("backends", ", ".join(doc["backends"]) or "none")
    info.add_row("engines", ", ".join(f"{k} {v}" for k, v in prof["engines"].items()))
    info.add_row("fingerprint", doc["fingerprint"][:23] + "…")
    choices = Table(title="backend per model")
    for col in ("model", "used by", "chosen", "latency ms", "measured", "pruned", "current"):
        choices.add_column(col, justify="right" if col in ("latency ms", "measured", "pruned") else "left")
    for m in doc["models"]:
        choices.add_row(
            m["model_key"][:19] + "…",
            ", ".join(f"{u['release']}:{u['model']}" for u in m["used_by"]) or "-",
            m["chosen"],
            f"{m['latency_ms']:.4f}",
            str(len(m["measurements"])),
            str(len(m["pruned"])),
            "yes" if m["current"] else "stale: device changed",
        )
    if not doc["models"]:
        choices.caption = "no selection yet: it runs when a bundle with a model is installed"
    return Group(info, choices)
