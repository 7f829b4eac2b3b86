import subprocess
import sys

import dualpath


def test_public_api_is_exported():
    for name in dualpath.__all__:
        assert hasattr(dualpath, name), name


def test_import_does_not_pull_gpu_or_heavy_backends():
    code = (
        "import sys, dualpath, dualpath.config, dualpath.cli;"
        "import torch;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('triton','nixl','nixl_cu12','kvikio','cupy','zmq','transformers')];"
        "assert not bad, bad;"
        "assert not torch.cuda.is_initialized();"
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_config_and_operator_commands_import_without_torch():
    """`import dualpath`, every config, the CLI's parser, the operator client (`dualpath ctl`) and the scheduler
    process need no torch: importing it costs ~1.6 s (which `ctl stop` paid before reaching the scheduler, and a
    cold scheduler restart on top of its start) and ~180 MB of memory."""
    code = (
        "import sys, dualpath, dualpath.config, dualpath.cli, dualpath.control.client, dualpath.commands.ctl;"
        "import dualpath.control.schedulerd;"
        "dualpath.cli.build_parser();"
        "dualpath.load_config();"
        "import dualpath.storage.config, dualpath.transports.config;"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('dualpath')];"
        "from dualpath import KVLayout, Storage, Transport;"  # the lazy names still resolve (and then need torch)
        "assert 'torch' in sys.modules;"
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
