"""Collect `bench_*.py` when pytest is pointed at the bench/ folder (explicit files are collected anyway)."""

import pytest


def pytest_collect_file(parent, file_path):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
