"""What every benchmark does with its result: print it and keep it in bench/reports/<name>.md."""

from pathlib import Path


def publish(name: str, lines: list[str]) -> None:
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(__file__).parent / "reports" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
