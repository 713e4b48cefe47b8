"""The documentation agrees with the code: every setting is documented, the README stays a front
page, and its links lead somewhere. (`make test` also builds the docs site with `mkdocs build
--strict`, which checks the links and anchors between the pages under docs/.)"""
from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 12 * 1024


def test_every_setting_is_documented_in_configuration_page():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", page))
    missing = sorted(name.upper() for name in Settings.model_fields if name.upper() not in documented)
    assert not missing, f"settings of service/config.py missing from docs/configuration.md: {', '.join(missing)}"


def test_configuration_page_names_no_setting_that_does_not_exist():
    # every row of a table whose first cell is a backticked variable must be a setting, unless the
    # page lists it under "Outside the settings class"
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    inside, _, outside = page.partition("## Outside the settings class")
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)`", inside, flags=re.MULTILINE)
    fields = {name.upper() for name in Settings.model_fields}
    unknown = sorted(set(rows) - fields)
    assert not unknown, f"docs/configuration.md documents settings that service/config.py does not have: {', '.join(unknown)}"
    assert outside, "docs/configuration.md lost its 'Outside the settings class' section"


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it under {README_MAX_BYTES} and move details to docs/"


def test_readme_links_point_at_existing_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t and not t.startswith("#")]
    assert targets, "README.md links to no page"
    missing = sorted({t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()})
    assert not missing, f"README.md links to missing files: {', '.join(missing)}"
