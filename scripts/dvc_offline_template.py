"""Write .dvc/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed
inlined, so `dvc plots show` draws its curves without network (DVC's own page loads them
from a CDN, and the curves stay blank offline). .dvc/config names it as html_template.

The libraries are the copies Snakemake ships for its HTML reports (snakemake is in the
`pipeline` extra beside dvc; BSD-3-Clause, their licences are kept in the page): vega 5,
vega-lite 5 and vega-embed 6, the majors DVC's renderer writes specs for. Rerun after a
Snakemake upgrade:  python scripts/dvc_offline_template.py
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots" / "offline.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # in load order: embed needs the other two

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (offline)</title>
    <!-- Written by scripts/dvc_offline_template.py: vega, vega-lite and vega-embed inlined
         from snakemake/assets/data, so the page needs no network. -->
{libraries}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    assets = resources.files("snakemake") / "assets" / "data"
    parts = []
    for name in LIBRARIES:
        licence = (assets / name / "LICENSE").read_text(encoding="utf8")
        code = (assets / name / f"{name}.js").read_text(encoding="utf8")
        for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if marker in code:  # would end the inline script early, or be filled in by DVC
                raise SystemExit(f"{name}.js contains {marker!r}: cannot inline it")
        parts.append(f"    <!-- {name}\n{licence}\n    -->\n    <script>\n{code}\n    </script>")
    # DVC fills {plot_divs} and {refresh_tag}; no {scripts}, where it would put its CDN links.
    return PAGE.replace("{libraries}", "\n".join(parts))


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from lambdapipe.atomic import write_text

    write_text(OUT, page())
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
