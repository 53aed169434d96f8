"""The edge runtime must not need torch (the `edge` extra does not install it)."""

from __future__ import annotations

import subprocess
import sys


def test_edge_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import csi_edge, csi_edge.bundle, csi_edge.codec, csi_edge.entropy, csi_edge.preprocess\n"
        "import csi_edge.recording, csi_edge.cli, csi_edge.inspect\n"
        "import csi_edge.agent, csi_edge.sources, csi_edge.spool, csi_edge.rollout\n"
        "import csi_edge.settings, aiomqtt\n"
        "from csi_edge.readers import nexmon, intel5300, esp32, ntufi\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'csi_cloud'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"edge imports pulled in {run.stdout} {run.stderr}"
