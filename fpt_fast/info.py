"""`python -m fpt_fast.info`: versions, device and which backends run here (and why not)."""
from .app.info import report

if __name__ == "__main__":
    print(report())
