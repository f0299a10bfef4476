"""deploy/'s manifests and compose files name only settings the gateway declares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.deploy import (
    DEPLOY,
    K8S,
)


def deploy_yaml_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *DEPLOY.glob("docker-compose*.yml")])


@pytest.mark.parametrize("path", deploy_yaml_files(), ids=lambda p: p.name)
def test_deploy_files_name_only_declared_settings(path: Path) -> None:
    """Every CAFE_ variable a manifest or compose file names, set or in a comment (the
    commented-out examples included), is one the gateway declares."""
    from gateway.config import declared_variables

    declared = {variable.name for variable, _ in declared_variables()}
    named = set(re.findall(r"\bCAFE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    assert not named - declared, f"{path.name} names undeclared settings: {named - declared}"
