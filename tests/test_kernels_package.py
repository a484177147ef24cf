"""Our top-level ``kernels`` package must never be taken for Hugging Face's ``kernels`` hub package,
which transformers probes for and would then import hub kernels from (DESIGN.md)."""

import subprocess
import sys

import transformers
from packaging import version
from transformers.utils import import_utils


def test_transformers_does_not_see_hub_kernels():
    # transformers maps the import name `kernels` to our distribution (babymerge) and checks that
    # distribution's version against the hub package's supported range: babymerge must stay below.
    _, found = import_utils._is_package_available("kernels", return_version=True)
    minimum = version.parse(import_utils.KERNELS_MIN_VERSION)
    assert found == "N/A" or version.parse(found) < minimum, (
        f"transformers reads kernels version {found}: babymerge's version must stay below "
        f"{import_utils.KERNELS_MIN_VERSION} or transformers will import our kernels as the hub's")
    assert not transformers.utils.is_kernels_available()


def test_hub_kernels_integration_ignores_ours():
    """Importing transformers' hub-kernels integration (fresh process: no lru_cache from this one)
    neither fails nor binds any name from our package."""
    code = (
        "import kernels, transformers.integrations.hub_kernels as hk\n"
        "from transformers.utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "ours = {id(v) for v in vars(kernels).values()}\n"
        "bound = [n for n, v in vars(hk).items() if id(v) in ours and not n.startswith('__')]\n"
        "assert not bound, bound\n"
        "assert not hasattr(kernels, '__version__')  # transformers' last-resort version probe\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
