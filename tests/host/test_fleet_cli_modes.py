"""`edgepipe bench --mode throughput --streams N` and `--profile-ops` through a loopback agent."""
from __future__ import annotations

import json

from click.testing import CliRunner

from bundle_factory import make_bundle
from edgepipe.device.agent import Agent, AgentServer
from edgepipe.device.bundle_store import BundleStore
from edgepipe.pipeline.cli import main as edgepipe


def test_bench_cli_passes_mode_streams_and_profile_ops(tmp_path):
    bundle = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    core = Agent(BundleStore(tmp_path / "store"))
    srv = AgentServer(core, "127.0.0.1", 0)
    srv.start_background()
    try:
        common = ["bench", str(bundle), "--device", srv.url, "--no-db", "--json", "--runs", "10", "--warmup", "1",
                  "--min-secs", "0"]
        res = CliRunner().invoke(edgepipe, [*common, "--mode", "throughput", "--streams", "2"])
        assert res.exit_code == 0, res.output
        (o,) = json.loads(res.stdout)["outcomes"]
        assert o["setting"]["mode"] == "throughput" and o["report"]["throughput"]["streams"] == 2
        res = CliRunner().invoke(edgepipe, [*common, "--profile-ops"])
        assert res.exit_code == 0, res.output
        (o,) = json.loads(res.stdout)["outcomes"]
        assert o["setting"]["profile_ops"] is True and "available" in o["report"]["profile"]
        res = CliRunner().invoke(edgepipe, [*common, "--streams", "2"])
        assert res.exit_code == 2 and "--streams needs --mode throughput" in res.output
    finally:
        srv.shutdown()
        srv.server_close()
        core.close()
