"""Which of transformers' architectures this project runs: every causal-LM and image-text-to-text model type in the
installed transformers' registries, read by :func:`dualpath.model.spec.load_spec` from its config class's default
config (``architectures`` set to the registry's class).

Each model type lands in one of four classes:

* ``runs``: a spec is built (the exactness of each family is what ``tests/model/`` checks against transformers);
* ``refused``: a :class:`~dualpath.errors.ModelError` that names why (linear-attention state, draft models,
  cross-attention, ...);
* ``not_implemented``: refused as an unknown architecture (no reason beyond the list of supported ones);
* ``default_config_error``: transformers' own default config is not one we can run (e.g. a head size whose RoPE
  half is odd), or transformers cannot build it here.

Nothing is downloaded: only config classes are instantiated. Run:
``python benchmarks/hf_registry_coverage.py [--json OUT] [--list]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any


def classify() -> dict[str, Any]:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    from dualpath.errors import ModelError
    from dualpath.model.spec import load_spec

    registries = {"causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                  "image_text_to_text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    out: dict[str, Any] = {"transformers": transformers.__version__, "registries": {}}
    for reg, mapping in registries.items():
        rows: dict[str, list[dict[str, str]]] = {"runs": [], "refused": [], "not_implemented": [],
                                                 "default_config_error": []}
        for model_type, arch in mapping.items():
            row = {"model_type": model_type, "architecture": arch}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = AutoConfig.for_model(model_type).to_dict()
            except Exception as exc:  # (transformers cannot build its own default here)
                rows["default_config_error"].append({**row, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            cfg["architectures"] = [arch]
            try:
                load_spec(cfg)
            except ModelError as exc:
                msg = str(exc)
                head = msg.split("; supported:")[0]
                if "unsupported architecture" in msg and "] (" not in head:
                    rows["not_implemented"].append(row)
                elif "unsupported architecture" in msg:
                    rows["refused"].append({**row, "reason": head.split("] (", 1)[1].rstrip(")")[:200]})
                else:
                    rows["default_config_error"].append({**row, "reason": msg[:200]})
                continue
            except Exception as exc:
                rows["default_config_error"].append({**row, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            rows["runs"].append(row)
        out["registries"][reg] = {"counts": {k: len(v) for k, v in rows.items()}, **rows}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", help="write the classification here")
    parser.add_argument("--list", action="store_true", help="print every model type, not only the counts")
    args = parser.parse_args(argv)
    res = classify()
    print(f"transformers {res['transformers']}")
    for reg, body in res["registries"].items():
        total = sum(body["counts"].values())
        print(f"{reg}: {total} model types: " + ", ".join(f"{k} {v}" for k, v in body["counts"].items()))
        if args.list:
            for cls in ("runs", "refused", "not_implemented", "default_config_error"):
                for row in body[cls]:
                    extra = f"  ({row['reason']})" if "reason" in row else ""
                    print(f"  {cls:22s} {row['model_type']:28s} {row['architecture']}{extra}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
