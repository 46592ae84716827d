"""dtm-ops: dataset mining by Deep Template Matching (Kothawade et al., IEEE IV 2022).

The package is importable without torch; heavy modules import it themselves.
"""

__version__ = "0.1.0"
