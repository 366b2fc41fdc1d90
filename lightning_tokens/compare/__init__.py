"""``lightning-tokens compare``: does a token method help on your task? Every variant × seed from one
base config, trained and tested, summarised in one table and one chart.

    lightning-tokens compare --config configs/compare_smollm2_nupa.yaml --methods none,dft,rho1 --seeds 1,2
"""

from lightning_tokens.compare.command import compare, main, write_report
from lightning_tokens.compare.runner import RunResult
from lightning_tokens.compare.variants import METHODS, Variant, load_variants, parse_methods

__all__ = ["METHODS", "RunResult", "Variant", "compare", "load_variants", "main", "parse_methods", "write_report"]
