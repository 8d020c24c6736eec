"""The module's own map: its docstring names every section of chatsvc.py, in order."""

import pathlib
import re

import chatsvc


def test_the_docstring_map_names_every_section_in_order():
    source = pathlib.Path(chatsvc.__file__).read_text(encoding="utf-8")
    headers = re.findall(r"^# ── (.*)$", source, flags=re.M)
    mapped = re.findall(r"^    (\S.*?)\s{2,}\S", chatsvc.__doc__, flags=re.M)
    assert len(headers) == len(mapped) > 20
    for header, name in zip(headers, mapped, strict=True):
        assert re.match(re.escape(name) + r"(:| ─)", header), f"the map says {name!r} where the section is {header!r}"
