"""`python -m fpt_fast.info`: versions, the native extension's state, and which backend runs which
op on each device here (and why not): fpt_fast.app.environment_report."""
from .app.environment_report import report

if __name__ == "__main__":
    print(report())
