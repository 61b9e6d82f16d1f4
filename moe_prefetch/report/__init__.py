"""Reports of a run: run.json (`profiling`, versioned), terminal tables (`text`) and the
self-contained HTML page (`html`). Library code never prints.

Layer: above `evidence` (a run's replay on other hardware) and everything below it; never imports serve or cli.
"""
