"""The MLflow tracking server configs (infra/mlflow): commands that the installed ``mlflow
server`` accepts, stores wired to the services that exist, the same MLflow minor version as
the client, and no secrets on command lines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import mlflow.cli
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "infra" / "mlflow"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``
    (the variable must be set), ``$$`` for a literal ``$``."""

    def value(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"${{{name}}} must be set: {arg}"
        return arg if op == ":-" else ""

    text = re.sub(r"(?<!\$)\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)
    return text.replace("$$", "$")


def env_file(path: Path) -> dict[str, str]:
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


EXAMPLE_ENV = env_file(FOLDER / "env.example")
COMPOSE = yaml.safe_load(interpolate((FOLDER / "docker-compose.yaml").read_text(), EXAMPLE_ENV))
K8S = [d for d in yaml.safe_load_all((FOLDER / "k8s.yaml").read_text()) if d]
SERVER_ENV = {p.envvar for p in mlflow.cli.server.params if p.envvar}  # e.g. MLFLOW_HOST


def server_options(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Parse an ``mlflow server ...`` command line (plus its environment) with the installed
    MLflow's own command-line parser; returns the option values it would run with."""
    assert command[:2] == ["mlflow", "server"], command
    with pytest.MonkeyPatch.context() as mp:
        for name in SERVER_ENV:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        ctx = mlflow.cli.server.make_context("server", list(command[2:]))
    return ctx.params


def compose_env(service: str) -> dict[str, str]:
    env = COMPOSE["services"][service].get("environment", {})
    return {k: str(v) for k, v in env.items()}


def test_the_server_image_is_the_client_minor_version() -> None:
    (base,) = re.findall(r"^FROM\s+\S+:v(\d+\.\d+)\.\d+", (FOLDER / "Dockerfile").read_text(), re.M)
    assert base == ".".join(mlflow.__version__.split(".")[:2])
    for image in (COMPOSE["services"]["mlflow"]["image"], deployment()["containers"][0]["image"]):
        assert image.endswith(f":{mlflow.__version__}"), image


def test_compose_server_uses_postgres_and_minio_through_the_artifact_proxy() -> None:
    services = COMPOSE["services"]
    env = compose_env("mlflow")
    opts = server_options(services["mlflow"]["command"], env)
    assert opts["serve_artifacts"] is True and opts["artifacts_only"] is False

    store = urlsplit(opts["backend_store_uri"])
    pg = compose_env("postgres")
    assert store.scheme == "postgresql" and store.hostname == "postgres" and store.port == 5432
    assert (store.username, store.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_DB"])
    assert store.password == pg["POSTGRES_PASSWORD"]  # the same ${POSTGRES_PASSWORD}

    bucket = urlsplit(opts["artifacts_destination"])
    assert bucket.scheme == "s3"
    create = " ".join(services["create-bucket"]["entrypoint"])
    assert f"mc mb --ignore-existing local/{bucket.hostname}" in create
    endpoint = urlsplit(env["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and "minio" in services

    published = services["mlflow"]["ports"][0].rsplit(":", 1)[1]
    assert int(published) == opts["port"]
    depends = services["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["create-bucket"]["condition"] == "service_completed_successfully"


def test_no_password_on_a_command_line() -> None:
    commands = [" ".join(COMPOSE["services"]["mlflow"]["command"])]
    commands.append(" ".join(deployment()["containers"][0]["command"]))
    for command in commands:
        assert "PASSWORD" not in command and "@" not in command, command


def deployment() -> dict[str, Any]:
    (d,) = [d for d in K8S if d["kind"] == "Deployment"]
    return d["spec"]["template"]["spec"]


def test_k8s_server_reads_its_stores_from_the_secret_and_serves_the_service_port() -> None:
    (c,) = deployment()["containers"]
    env = {e["name"]: e for e in c["env"]}
    stores = {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"}
    assert stores <= SERVER_ENV  # names `mlflow server` reads
    for name in stores:
        assert "secretKeyRef" in env[name]["valueFrom"], name
    fake = {n: f"x://{n.lower()}" for n in stores}
    fake["MLFLOW_SERVER_ALLOWED_HOSTS"] = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"]
    opts = server_options(c["command"], fake)
    assert opts["serve_artifacts"] is True
    assert opts["backend_store_uri"] == fake["MLFLOW_BACKEND_STORE_URI"]

    (service,) = [d for d in K8S if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    (container_port,) = c["ports"]
    assert port["targetPort"] == container_port["name"]
    assert container_port["containerPort"] == opts["port"]
    assert service["spec"]["selector"].items() <= deployment_labels().items()


def deployment_labels() -> dict[str, str]:
    (d,) = [d for d in K8S if d["kind"] == "Deployment"]
    return d["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize(
    "host",
    ["mlflow:5000", "mlflow.default.svc.cluster.local:5000", "127.0.0.1:5000", "10.4.2.7:5000"],
)
def test_k8s_server_answers_the_hosts_clients_and_probes_use(host: str) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    (c,) = deployment()["containers"]
    (allowed,) = [e["value"] for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert is_allowed_host_header([h.strip() for h in allowed.split(",")], host)
    assert not is_allowed_host_header([h.strip() for h in allowed.split(",")], "evil.com:5000")
