"""The files a fresh clone is set up from agree with each other."""
import os

from conftest import ROOT


def read(name):
    return open(os.path.join(ROOT, name)).read()


def test_env_yml_pins_what_requirements_pins():
    reqs = [line.strip() for line in read("requirements.txt").splitlines() if line.strip() and line[0] != "#"]
    env = [line.strip()[2:] for line in read("env.yml").splitlines() if line.startswith("      - ")]
    assert env == reqs
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs


def test_ci_runs_the_readme_test_command():
    readme, ci = read("README.md"), read(".ci/run")
    assert "make test" in ci and "make test" in readme.split("\n## ", 2)[1]  # in the first section
    assert "mlxtend==0.25.0" in read("Makefile")
