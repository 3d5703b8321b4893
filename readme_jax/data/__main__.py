"""``python -m readme_jax.data [names...] [--no-apt] [--divergence]``: fetch domains, print a table."""

import argparse

from readme_jax.data.domains import DOMAIN_NAMES, domain_table, prepare_domains, word_divergence


def main(argv=None) -> None:
    """``python -m readme_jax.data [names...] [--no-apt] [--divergence]``: fetch, print a table."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("names", nargs="*", help=f"domains (default: all of {list(DOMAIN_NAMES)})")
    ap.add_argument("--no-apt", action="store_true", help="do not use apt-get for the Debian domains")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--divergence", action="store_true", help="also print word-unigram JS divergences")
    a = ap.parse_args(argv)
    rep = prepare_domains(a.names or None, allow_apt=not a.no_apt, cache_dir=a.cache_dir)
    print("| domain | docs | chars | train / validation / test chars | package | license |")
    print("|---|---:|---:|---|---|---|")
    for r in domain_table(a.cache_dir):
        if r["name"] in rep.available:
            sc = r["split_chars"]
            print(f"| {r['name']} | {r['n_docs']:,} | {r['n_chars']:,} | {sc['train']:,} / {sc['validation']:,} / "
                  f"{sc['test']:,} | {r['package']} | {r['license']} |")
    for n, why in rep.missing.items():
        print(f"missing: {n}: {why}")
    if a.divergence:
        names = list(rep.available)
        div = word_divergence(names, a.cache_dir)
        print("\nword-unigram Jensen-Shannon divergence (bits) between train splits:")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for x in names:
            cells = ["0" if x == y else f"{div[tuple(sorted((x, y)))]:.3f}" for y in names]
            print(f"| {x} | " + " | ".join(cells) + " |")




if __name__ == "__main__":
    main()
