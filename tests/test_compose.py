"""compose.yaml and the Dockerfile: valid for Compose, required variables enforced, and the
structure docs/deployment.md promises (healthchecks, start order, targets, non-root images, an
edge image without torch). Building and running the images needs a Docker engine, which CI
does not have; tests/test_compose_processes.py runs the same services as local processes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The variables compose.yaml requires (`${VAR:?message}`), with dummy values.
REQUIRED = {
    "CSI_CLOUD_TOKEN": "compose-test-token-0123456789",
    "POSTGRES_PASSWORD": "pg-test-password",
    "CSI_CLOUD_MQTT_PASSWORD": "mqtt-cloud-password",
    "CSI_EDGE_MQTT_PASSWORD": "mqtt-edge-password",
    "CSI_MQTT_HEALTHCHECK_PASSWORD": "mqtt-health-password",
}


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dockerfile_stages(text: str | None = None) -> dict[str, dict]:
    """Stages of the Dockerfile by name: ``base`` (the FROM image or stage), the instructions
    as (KEYWORD, arguments) with line continuations joined, and ENV as a dict."""
    text = DOCKERFILE.read_text() if text is None else text
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, dict] = {}
    current: dict | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"base": parts[0], "instructions": [], "env": {}}
            continue
        if current is None:
            continue
        current["instructions"].append((keyword, args.strip()))
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                if sep:
                    current["env"][key] = value
    return stages


def stage_chain(stages: dict[str, dict], target: str) -> list[str]:
    """``target`` and the stages it is built FROM, the root first."""
    chain = [target]
    while stages[chain[-1]]["base"] in stages:
        chain.append(stages[chain[-1]]["base"])
    return chain[::-1]


def image_env(target: str) -> dict[str, str]:
    stages = dockerfile_stages()
    env: dict[str, str] = {}
    for name in stage_chain(stages, target):
        env.update(stages[name]["env"])
    return env


def _instructions(target: str, keyword: str) -> list[str]:
    stages = dockerfile_stages()
    return [args for name in stage_chain(stages, target)
            for kw, args in stages[name]["instructions"] if kw == keyword]


def docker_compose() -> list[str]:
    """The Compose command: ``docker-compose`` (v1, Debian's package) or ``docker compose``."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if IN_CI:
        pytest.fail("CI=true but docker-compose is not installed (.ci/run installs it)")
    pytest.skip("needs docker-compose (apt-get install docker-compose) to validate compose.yaml")


def run_config(tmp_path: Path, env_values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with exactly ``env_values`` for the deployment's variables
    (nothing from the caller's environment or a local .env file)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CSI_", "POSTGRES_", "COMPOSE_", "DOCKER_"))}
    env.update(env_values)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run([*docker_compose(), "--env-file", str(empty), "-f", str(COMPOSE_FILE),
                           "config"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_compose_config_is_valid_and_resolves_the_variables(tmp_path: Path) -> None:
    out = run_config(tmp_path, REQUIRED)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    # The single-node stack (services without a profile; "cluster": test_workers.py).
    services = {n: v for n, v in resolved["services"].items() if not v.get("profiles")}
    assert set(services) == {"mosquitto", "postgres", "cloud", "edge"}
    cloud = services["cloud"]["environment"]
    assert cloud["CSI_CLOUD_TOKEN"] == REQUIRED["CSI_CLOUD_TOKEN"]
    assert cloud["CSI_CLOUD_DB"] == (
        f"postgresql+psycopg://csi:{REQUIRED['POSTGRES_PASSWORD']}@postgres/csi")
    assert cloud["CSI_CLOUD_MQTT_PASSWORD"] == REQUIRED["CSI_CLOUD_MQTT_PASSWORD"]
    edge = services["edge"]["environment"]
    assert edge["CSI_EDGE_PASSWORD"] == REQUIRED["CSI_EDGE_MQTT_PASSWORD"]
    assert (edge["REPLAY_SITE"], edge["CSI_EDGE_USERNAME"]) == ("demo", "replay")
    assert edge["REPLAY_APS"] == "3" and edge["REPLAY_SOURCE"] == "file:///data/fition"
    broker = services["mosquitto"]["environment"]
    assert broker == {"CSI_MQTT_HEALTHCHECK_PASSWORD":
                      REQUIRED["CSI_MQTT_HEALTHCHECK_PASSWORD"]}
    # The sample recordings are replayed unless CSI_EDGE_DATA says otherwise.
    assert f"{ROOT / 'datasets' / 'samples'}:/data:ro" in services["edge"]["volumes"]


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_a_missing_required_variable(tmp_path: Path, missing: str) -> None:
    out = run_config(tmp_path, {k: v for k, v in REQUIRED.items() if k != missing})
    assert out.returncode != 0, out.stdout
    # The message written next to the variable in compose.yaml, so the operator knows what to
    # set (both Compose v1 and v2 print it).
    template = COMPOSE_FILE.read_text()
    messages = set(re.findall(r"\$\{" + missing + r":\?([^}]*)\}", template))
    assert messages, f"{missing} is not required with ${{{missing}:?message}}"
    assert any(m in out.stderr for m in messages), out.stderr


def test_every_secret_is_required_not_defaulted() -> None:
    template = COMPOSE_FILE.read_text()
    for name in REQUIRED:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", template)
        assert uses and all(u.startswith(":?") for u in uses), (name, uses)
    assert "change-me" not in template


def test_services_are_started_in_order_of_health() -> None:
    services = compose()["services"]
    for name in ("mosquitto", "postgres", "cloud"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert {"interval", "timeout", "retries"} <= set(check), name
    assert "mosquitto_sub" in services["mosquitto"]["healthcheck"]["test"][1]
    # With a login, as a user of its own: the client id is the user name, so a check logged
    # in as csi-cloud would take the cloud's session (and its queued segments) every 10 s.
    assert "-u healthcheck" in services["mosquitto"]["healthcheck"]["test"][1]
    assert "csi-cloud" not in services["mosquitto"]["healthcheck"]["test"][1]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    cloud_check = " ".join(services["cloud"]["healthcheck"]["test"])
    assert "urllib" in cloud_check and "/healthz" in cloud_check
    assert services["cloud"]["depends_on"] == {
        "mosquitto": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"}}
    assert services["edge"]["depends_on"] == {
        "mosquitto": {"condition": "service_healthy"},
        "cloud": {"condition": "service_healthy"}}


def test_images_volumes_and_mounts() -> None:
    doc = compose()
    services = doc["services"]
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert services["postgres"]["image"] == "postgres:16"
    assert services["cloud"]["build"] == {"context": ".", "target": "cloud"}
    assert services["edge"]["build"] == {"context": ".", "target": "edge"}
    assert set(doc["volumes"]) == {"mosquitto-data", "postgres-data", "recordings", "jobs",
                                   "edge-spool", "nats-1-data", "nats-2-data", "nats-3-data"}
    mounts = {name: services[name].get("volumes", []) for name in services}
    assert "mosquitto-data:/mosquitto/data" in mounts["mosquitto"]
    assert "./deploy/mosquitto/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in \
        mounts["mosquitto"]
    assert "postgres-data:/var/lib/postgresql/data" in mounts["postgres"]
    assert "./models:/app/models:ro" in mounts["cloud"]
    assert {"recordings:/var/lib/csi/recordings", "jobs:/var/lib/csi/jobs"} <= \
        set(mounts["cloud"])
    assert "${CSI_EDGE_DATA:-./datasets/samples}:/data:ro" in mounts["edge"]
    assert "edge-spool:/var/lib/csi/spool" in mounts["edge"]
    # The mounted config points at the mounted files.
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert "password_file /mosquitto/config/passwd" in conf
    assert "acl_file /mosquitto/config/acl" in conf
    # ... which the broker's command copies from the read-only mounts of the generated files.
    copy = services["mosquitto"]["command"][2]
    assert "cp /run/csi/passwd /run/csi/acl /mosquitto/config/" in copy
    assert "./deploy/mosquitto/passwd:/run/csi/passwd:ro" in mounts["mosquitto"]
    assert "./deploy/mosquitto/compose.acl:/run/csi/acl:ro" in mounts["mosquitto"]
    assert services["cloud"]["environment"]["CSI_CLOUD_BROKER"] == "mqtt://mosquitto:1883"
    assert services["edge"]["environment"]["CSI_EDGE_BROKER"] == "mqtt://mosquitto:1883"
    assert "8000" in services["cloud"]["ports"][0]


def test_edge_service_streams_several_aps_as_one_user() -> None:
    """The broker gives each MQTT user one session (client id = user name), so the replaying
    APs of the demo site run as streams of ONE process over one connection, as many as
    CSI_EDGE_APS says, named replay-1 ... replay-N (stable across a recreation, like the spool
    volume that keeps their queues); there is nothing to `--scale`."""
    edge = compose()["services"]["edge"]
    assert "container_name" not in edge and "ports" not in edge and "hostname" not in edge
    assert "deploy" not in edge  # no replicas
    assert not {"CSI_EDGE_AP", "CSI_EDGE_SITE", "CSI_EDGE_SOURCE"} & set(edge["environment"])
    assert edge["entrypoint"][:2] == ["sh", "-c"] and "exec csi edge" in edge["entrypoint"][2]
    env = {k: str(v).split(":-")[-1].rstrip("}") for k, v in edge["environment"].items()}
    # The entrypoint as Compose hands it to sh ($$ is a literal $), with the defaults.
    script = edge["entrypoint"][2].replace("$$", "$")
    out = subprocess.run(["sh", "-c", script.replace("exec csi edge", "printf '%s\\n'"),
                          edge["entrypoint"][3]], capture_output=True, text=True, check=True,
                         env={**env, "PATH": os.environ["PATH"]})
    args = out.stdout.split()
    assert args == [a for i in range(1, 4) for a in
                    ("--stream", f"demo/replay-{i}=file:///data/fition")]
    assert edge["environment"]["CSI_EDGE_LOOP"] == "true"
    assert edge["environment"]["CSI_EDGE_SPEED"] == "real"


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"builder", "edge", "cloud"} <= set(stages)
    for target in ("edge", "cloud"):
        chain = stage_chain(stages, target)
        assert stages[chain[0]]["base"] in ("${PYTHON_IMAGE}", "python:3.11-slim")
        # The project is installed from the wheel the shared builder stage made.
        copies = _instructions(target, "COPY")
        assert any("--from=builder /wheels" in c for c in copies), target
        installs = [r for r in _instructions(target, "RUN") if "pip install" in r]
        assert any(f"csi_pipeline-*.whl)[{target}]" in r for r in installs), installs
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE.read_text(), re.M)
    assert any("pip wheel" in r for _, r in stages["builder"]["instructions"])
    assert _instructions("edge", "ENTRYPOINT") == ['["csi", "edge"]']
    assert _instructions("cloud", "ENTRYPOINT") == ['["csi", "cloud"]']
    health = _instructions("cloud", "HEALTHCHECK")
    assert len(health) == 1 and "urllib" in health[0] and "/healthz" in health[0]
    assert not [args for stage in stages.values() for _, args in stage["instructions"]
                if "curl" in args or "apt-get" in args]  # nothing added to the slim base


def test_images_run_as_a_non_root_user() -> None:
    for target in ("edge", "cloud"):
        users = _instructions(target, "USER")
        assert users, f"{target}: no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), (target, users)
        # The last USER comes after every RUN (nothing is installed as that user after).
        stage = dockerfile_stages()[target]["instructions"]
        last_user = max(i for i, (kw, _) in enumerate(stage) if kw == "USER")
        assert not [kw for kw, _ in stage[last_user:] if kw == "RUN"], target


def test_edge_image_installs_no_torch() -> None:
    guard = "sys.exit(u.find_spec('torch') is not None)"  # the build fails if torch is there
    assert any(guard in r for r in _instructions("edge", "RUN"))
    for args in _instructions("edge", "RUN") + _instructions("edge", "COPY"):
        args = args.replace(guard, "")
        assert "torch" not in args, args
        assert "[cloud]" not in args and "requirements-cloud" not in args, args
    assert any("requirements-edge.txt" in c for c in _instructions("edge", "COPY"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not [d for d in extras["edge"] if d.lower().startswith("torch")]
    # The cloud image gets torch's CPU build (no CUDA libraries), before the cloud extra.
    cloud_runs = _instructions("cloud", "RUN")
    torch_at = next(i for i, r in enumerate(cloud_runs) if '"torch==${TORCH_VERSION}"' in r)
    extra_at = next(i for i, r in enumerate(cloud_runs) if ".whl)[cloud]" in r)
    assert torch_at < extra_at
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_dockerignore_keeps_state_and_secrets_out_but_the_samples_in() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for pattern in (".git", ".venv", "spool", "recordings", "**/*.db", ".env", "deploy",
                    "tests", "models/.fetched"):
        assert pattern in lines, pattern
    assert "!datasets/samples" in lines
    assert "models" not in lines and "datasets/samples" not in lines


def test_site_user_acl_for_the_replaying_edges(tmp_path: Path) -> None:
    """make-acl.py --site-user USER=SITE: one user for every AP of one site, confined to it."""
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "mosquitto" / "make-acl.py"),
                          "lab/ap1", "--site-user", "replay=demo"], capture_output=True,
                         text=True, check=True)
    blocks = [b.strip().splitlines() for b in out.stdout.split("\n\n")]
    replay = next(b for b in blocks if "user replay" in b)
    assert [line for line in replay if not line.startswith("#")] == [
        "user replay", "topic write csi/v1/demo/+/seg", "topic write csi/v1/demo/+/status",
        "topic read csi/v1/demo/+/ctl"]
    for bad in ("replay", "re/play=demo", "replay=de/mo", "csi-cloud=demo", "x=+"):
        run = subprocess.run([sys.executable, str(ROOT / "deploy" / "mosquitto" /
                                                  "make-acl.py"), "--site-user", bad],
                             capture_output=True, text=True)
        assert run.returncode == 2, (bad, run.stdout)


def test_deployment_doc_matches_the_compose_file() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    edge = compose()["services"]["edge"]["environment"]
    user = edge["CSI_EDGE_USERNAME"].split(":-")[1].rstrip("}")
    site = edge["REPLAY_SITE"].split(":-")[1].rstrip("}")
    assert f"--site-user {user}={site} --reader healthcheck" in doc
    assert "--acl deploy/mosquitto/compose.acl" in doc
    assert "--passwd deploy/mosquitto/passwd" in doc
    assert "CSI_EDGE_APS" in doc
    for name in REQUIRED:
        assert name in doc, name
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()
