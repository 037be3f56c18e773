"""help(bnorm) and the package metadata point wheel users, who have no docs/ folder, to the
online documentation and the source (issue 15, item 9)."""

import importlib.metadata
import pathlib
import re

import pytest

import bnorm

URL_LINE = re.compile(r"^(Documentation|Source): (https://\S+)$", re.M)


def _distribution():
    """The installed distribution of the bnorm package: bnorm, or the CUDA wheel bnorm-cu13."""
    for name in ("bnorm", "bnorm-cu13"):
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    pytest.skip("bnorm is not installed as a distribution (imported from a build tree)")


def test_help_names_documentation_and_source_urls():
    urls = dict(URL_LINE.findall(bnorm.__doc__))
    assert set(urls) == {"Documentation", "Source"}
    assert "docs/ folder" not in bnorm.__doc__


def test_package_metadata_has_the_urls_of_help():
    project_urls = dict(line.split(", ", 1) for line in _distribution().metadata.get_all("Project-URL") or [])
    for label, url in URL_LINE.findall(bnorm.__doc__):
        assert project_urls.get(label) == url, (label, project_urls)


def test_mkdocs_site_and_repository_match_the_metadata():
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / "mkdocs.yml").is_file():
        pytest.skip("no source tree (tests run from a copy, against a wheel)")
    mkdocs = (root / "mkdocs.yml").read_text()
    urls = dict(URL_LINE.findall(bnorm.__doc__))
    assert f"site_url: {urls['Documentation']}\n" in mkdocs
    assert f"repo_url: {urls['Source']}\n" in mkdocs
