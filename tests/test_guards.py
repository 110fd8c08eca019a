"""orpo.guards: the multi-process launch guard, stop signals and the clean exit (the multi-process runs
themselves are in test_distributed.py)."""

import pytest

from orpo.errors import OrpoError
from orpo.guards import launched_processes, require_distributed_launch


def test_one_of_several_launched_processes_must_not_train_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    require_distributed_launch(4)  # one data-parallel job of 4: fine
    with pytest.raises(OrpoError, match="one of 4 started by the launcher .* runs as 1 process") as err:
        require_distributed_launch(1)
    assert "use_cpu: true" in str(err.value)


def test_a_single_process_is_never_stopped(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    require_distributed_launch(1)
