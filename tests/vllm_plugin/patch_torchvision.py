"""Make a CUDA build of torchvision importable beside torch+cpu (see make_venv.sh): its fake
(meta) registrations for C++ ops run only when the ops exist. Idempotent."""

from __future__ import annotations

import importlib.util
import pathlib

MARKER = "# glimpse-ops: fake registrations only for ops this torchvision build has"


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("no torchvision: nothing to patch")
        return
    path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        print("already patched", path)
        return
    guard = (
        f"\n\n{MARKER}\n"
        "def _register_fake_if_present(name):\n"
        "    if torchvision.extension._has_ops():\n"
        "        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n"
    )
    anchor = "\n\n@functools.lru_cache(None)\ndef get_meta_lib"
    if anchor not in text:
        raise SystemExit(f"patch_torchvision: {path} has an unknown layout; see tests/vllm_plugin/make_venv.sh")
    head, _, rest = text.partition(anchor)
    rest = rest.replace("@torch.library.register_fake(", "@_register_fake_if_present(")
    path.write_text(head + guard + anchor + rest)
    print("patched", path)


if __name__ == "__main__":
    main()
