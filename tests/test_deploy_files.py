"""The deployment files say what the deployment needs: Dockerfile, .dockerignore, docker-compose.yml.

PyYAML is not a dependency, so the compose file is read with a small indentation reader that is enough for
its block mappings (CI also validates it with the real compose v2 binary, see .ci/run). Where the compose
file runs the project's own CLIs, their real argument parsers must accept the arguments it passes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from service import demo
from training.train import parse_config

ROOT = Path(__file__).resolve().parents[1]


def children(block: str) -> dict[str, str]:
    """The keys of a YAML block mapping at its outermost indentation → their inline value or nested block."""
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    result: dict[str, str] = {}
    key = None
    for line in lines:
        if len(line) - len(line.lstrip()) == indent and not line.lstrip().startswith("- "):
            key, _, value = line.strip().partition(":")
            result[key] = "" if value.strip().startswith("&") else value.strip()  # an anchor is no value
        elif key is not None:
            result[key] += "\n" + line
    return result


def path(block: str, *keys: str) -> str:
    for key in keys:
        block = children(block)[key]
    return block


def defaults(value: str) -> str:
    """Compose's ${VAR:-default} interpolation with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def flow_list(value: str) -> list[str]:
    """A flow sequence of double-quoted strings, possibly over several lines: ["a", "b"]."""
    return json.loads(" ".join(line.strip() for line in value.splitlines()))


@pytest.fixture(scope="module")
def compose() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def services(compose: str) -> dict[str, str]:
    return children(children(compose)["services"])


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a '# syntax=' line pulls docker/dockerfile"
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_reader_reads_nested_blocks() -> None:
    text = "a:\n  b:\n    c: 1\n  # note\n  d: [x]\ne: 2\n"
    assert children(text) == {"a": "\n  b:\n    c: 1\n  d: [x]", "e": "2"}
    assert path(text, "a", "b", "c") == "1" and path(text, "a", "d") == "[x]"


def test_services_and_volumes(compose: str, services: dict[str, str]) -> None:
    assert {"init", "api", "train", "train-gpu"} <= set(services)
    assert "build" in children(services["api"]) and "build" not in children(services["init"])  # one build of the image
    assert path(services["api"], "image") == path(services["init"], "image") == "centerid:latest"
    assert {"bundles", "gallery", "samples"} <= set(children(children(compose)["volumes"]))


def test_every_api_container_shares_one_model_cache(
    compose: str, services: dict[str, str], dockerfile: list[str]
) -> None:
    """The export and the recorded backend choice live on one volume at the image's CENTERID_MODEL_CACHE_DIR,
    writable by the image's user: a restart or another replica reuses them instead of measuring anew."""
    text = "\n".join(dockerfile)
    assert re.search(r"CENTERID_MODEL_CACHE_DIR=/model-cache\b", text)
    assert re.search(r"chown centerid:centerid [^\n]*/model-cache", text)
    assert "model-cache" in children(children(compose)["volumes"])
    for name in ("api", "replica"):
        mounts = {line.strip() for line in path(services[name], "volumes").splitlines() if line.strip()}
        assert "- model-cache:/model-cache" in mounts, name


def test_api_waits_for_the_init_job(services: dict[str, str]) -> None:
    assert path(services["api"], "depends_on", "init", "condition") == "service_completed_successfully"
    assert path(services["init"], "restart") == '"no"'


def test_api_health_ports_restart_and_volumes(services: dict[str, str]) -> None:
    api = services["api"]
    test = flow_list(path(api, "healthcheck", "test"))
    assert test[:2] == ["CMD", "python"] and "http://127.0.0.1:8000/ready" in test[-1]
    assert re.fullmatch(r'- "127\.0\.0\.1:\$\{CENTERID_PORT:-8000\}:8000"', path(api, "ports").strip())
    assert path(api, "restart") == "unless-stopped"
    mounts = {line.strip() for line in path(api, "volumes").splitlines() if line.strip()}
    assert {"- bundles:/bundles:ro", "- gallery:/gallery"} <= mounts
    assert path(api, "environment", "CENTERID_DATA_DIR") == "/gallery"
    assert path(services["init"], "healthcheck", "disable") == "true"


def test_init_runs_the_demo_bootstrap_into_what_api_serves(services: dict[str, str]) -> None:
    command = [defaults(arg) for arg in flow_list(path(services["init"], "command"))]
    assert command[:4] == ["python", "-m", "service.demo", "--no-serve"]
    args, training_args = demo.parse_args(command[3:])  # the CLI's own parser accepts them
    assert args.no_serve and training_args == []
    env = children(path(services["api"], "environment"))
    assert str(args.bundle) == defaults(env["CENTERID_BUNDLE"])
    assert args.port == 8000 and args.samples_shown_as == "./samples"
    assert str(args.gallery) == env["CENTERID_DATA_DIR"]
    init_mounts = path(services["init"], "volumes")
    for folder in (args.bundle.parent, args.gallery, args.samples):
        assert re.search(rf"- \w+:{folder}$", init_mounts, re.M), f"{folder} is not on a volume"


def test_training_profiles(services: dict[str, str], compose: str) -> None:
    assert flow_list(path(services["train"], "profiles")) == ["train"]
    assert flow_list(path(services["train-gpu"], "profiles")) == ["train-gpu"]
    devices = path(services["train-gpu"], "deploy", "resources", "reservations", "devices")
    assert "driver: nvidia" in devices and "capabilities: [gpu]" in devices
    anchor = children(compose)["x-train"]
    assert flow_list(path(anchor, "entrypoint")) == ["python", "-m", "training"]
    assert re.search(r"- \$\{CENTERID_TRAIN_DATA:-\./data\}:/data:ro$", path(anchor, "volumes"), re.M)
    config = parse_config(["--data", "/data/faces", "--output", "/bundles/faces"])  # the documented invocation
    assert (config.data, config.output) == ("/data/faces", "/bundles/faces")


def test_dockerfile_is_multistage_non_root_with_healthcheck(dockerfile: list[str]) -> None:
    assert dockerfile[0] == "ARG BASE_IMAGE=python:3.11-slim"
    stages = [line for line in dockerfile if line.startswith("FROM ")]
    assert stages == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE} AS runtime"]
    runtime = dockerfile[dockerfile.index(stages[1]) :]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert "http://127.0.0.1:8000/ready" in health and "curl" not in health
    (cmd,) = [line for line in runtime if line.startswith("CMD ")]
    assert json.loads(cmd[4:]) == ["python", "-m", "service"]  # the hardened server, not bare uvicorn
    (env,) = [line for line in runtime if line.startswith("ENV ") and "CENTERID_HOST" in line]
    assert "CENTERID_HOST=0.0.0.0" in env and "CENTERID_PORT=8000" in env
    assert "CENTERID_ALLOW_ANONYMOUS" not in env  # a bare `docker run` of an open service refuses to start


def dockerfile_env(dockerfile: list[str]) -> dict[str, str]:
    runtime = dockerfile[dockerfile.index("FROM ${BASE_IMAGE} AS runtime") :]
    pairs = [item.split("=", 1) for line in runtime if line.startswith("ENV ") for item in line[4:].split()]
    return {name: value for name, value in pairs}


def test_compose_api_environment_passes_the_exposure_check(
    services: dict[str, str], dockerfile: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the api container would read at start (image ENV, then compose's environment with nothing set
    in the shell): an open demo on 0.0.0.0 must be allowed explicitly, or the container exits."""
    from service.server import StartupRefused, check_exposure
    from service.settings import Settings

    compose_env = {k: defaults(v) for k, v in children(path(services["api"], "environment")).items()}
    assert compose_env["CENTERID_ALLOW_ANONYMOUS"] == "true" and compose_env["CENTERID_API_KEYS"] == ""
    for name in [n for n in os.environ if n.startswith("CENTERID_")]:
        monkeypatch.delenv(name)
    for name, value in {**dockerfile_env(dockerfile), **compose_env}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and not settings.auth_enabled
    check_exposure(settings)
    monkeypatch.setenv("CENTERID_ALLOW_ANONYMOUS", "false")
    with pytest.raises(StartupRefused, match="CENTERID_ALLOW_ANONYMOUS"):
        check_exposure(Settings())


def test_dockerfile_torch_is_pinned_cpu_by_default_from_local_wheels(dockerfile: list[str]) -> None:
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "ARG PIP_FIND_LINKS=/wheels" in dockerfile
    (torch_run,) = [line for line in dockerfile if '"torch==${TORCH_VERSION}"' in line]
    assert "--mount=type=bind,source=wheels,target=/wheels" in torch_run
    assert (ROOT / "wheels" / "README").is_file()


def test_dockerignore_keeps_state_and_caches_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".cache", "data", "bundles", "gallery", "samples", "**/__pycache__"} <= ignored
    assert "wheels" not in ignored and "training" not in ignored and "service" not in ignored


def test_ci_runs_the_readme_test_command() -> None:
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
    assert "make test" in (ROOT / "README.md").read_text()


# -- the scale profile (docker compose --profile scale): PostgreSQL, N replicas, nginx ------------------------
def environment(service: str) -> dict[str, str]:
    return {name: defaults(value) for name, value in children(path(service, "environment")).items()}


def mounts(service: str) -> set[str]:
    return {line.strip() for line in path(service, "volumes").splitlines() if line.strip()}


def nginx_directive(conf: str, name: str) -> str:
    (value,) = re.findall(rf"^\s*{name}\s+([^;{{}}#]+);", conf, re.M)
    return value.strip()


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def test_scale_postgres_has_a_pg_isready_healthcheck_and_a_named_volume(compose: str, services: dict[str, str]) -> None:
    postgres = services["postgres"]
    assert flow_list(path(postgres, "profiles")) == ["scale"] and path(postgres, "image") == "postgres:15"
    env = environment(postgres)
    test = flow_list(path(postgres, "healthcheck", "test"))
    assert test == ["CMD-SHELL", f"pg_isready -U {env['POSTGRES_USER']} -d {env['POSTGRES_DB']}"]
    assert "- pgdata:/var/lib/postgresql/data" in mounts(postgres)
    assert "pgdata" in children(children(compose)["volumes"])


def test_scale_replicas_share_the_database_and_are_reached_only_through_nginx(
    services: dict[str, str], dockerfile: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.parse import urlsplit

    from service.server import check_exposure
    from service.settings import Settings

    replica, postgres = services["replica"], services["postgres"]
    assert flow_list(path(replica, "profiles")) == ["scale"] and path(replica, "image") == "centerid:latest"
    assert int(defaults(path(replica, "deploy", "replicas"))) >= 2
    assert path(replica, "depends_on", "postgres", "condition") == "service_healthy"
    assert path(replica, "depends_on", "init", "condition") == "service_completed_successfully"  # the bundle
    assert "ports" not in children(replica)
    assert "- bundles:/bundles:ro" in mounts(replica)
    env, db = environment(replica), environment(postgres)
    url = urlsplit(env["CENTERID_DATABASE_URL"])
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.password, url.path) == (
        db["POSTGRES_USER"],
        db["POSTGRES_PASSWORD"],
        f"/{db['POSTGRES_DB']}",
    )
    for name in [n for n in os.environ if n.startswith("CENTERID_")]:
        monkeypatch.delenv(name)
    for name, value in {**dockerfile_env(dockerfile), **env}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # what a replica reads at start: it must pass the exposure check, or it exits
    assert settings.database_url == env["CENTERID_DATABASE_URL"]
    check_exposure(settings)


def test_scale_nginx_balances_every_replica_within_the_api_limits(services: dict[str, str]) -> None:
    from service.settings import Settings

    lb = services["lb"]
    assert flow_list(path(lb, "profiles")) == ["scale"] and path(lb, "image") == "nginx:1.22"
    assert path(lb, "depends_on", "replica", "condition") == "service_healthy"
    published = re.fullmatch(r'- "127\.0\.0\.1:\$\{CENTERID_SCALE_PORT:-8080\}:(\d+)"', path(lb, "ports").strip())
    assert published, "the load balancer is published on 127.0.0.1 only"
    assert "- ./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in mounts(lb)
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert nginx_directive(conf, "listen") == published.group(1)
    server = nginx_directive(conf, "server").split()
    assert server[0] == f"replica:{Settings().port}"  # the compose service name: one address per replica
    defaults_ = Settings()
    assert seconds(nginx_directive(conf, "proxy_read_timeout")) > defaults_.request_timeout_s  # the API's 503 first
    body = re.fullmatch(r"(\d+)m", nginx_directive(conf, "client_max_body_size"))
    assert body and int(body.group(1)) * 2**20 > defaults_.max_body_bytes  # the API's own 413 answers, not nginx
    assert "non_idempotent" not in nginx_directive(conf, "proxy_next_upstream")  # an enrollment is never sent twice
    assert "upstream=$upstream_addr" in conf and re.search(r"^\s*access_log /dev/stdout upstream;", conf, re.M)
