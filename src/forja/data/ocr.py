"""OCR for the pages of a PDF that have no text layer (a scan, a photo of a page): each such page is rendered
(pypdfium2) and read by Tesseract (Debian's `tesseract-ocr`, through pytesseract), offline, in Spanish and
English when installed. Used by `forja data` and `forja knowledge add` whenever Tesseract is installed
(`make` installs it as root); FORJA_OCR=off turns it off.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

RENDER_DPI = 300  # Tesseract reads body text best at 300 dpi
PREFERRED = ("spa", "eng")  # the languages read when installed; others installed are used only without these


@lru_cache(maxsize=1)
def _installed() -> tuple[str, ...] | None:
    """Tesseract's installed languages, or None when OCR cannot run here."""
    if shutil.which("tesseract") is None:
        return None
    try:
        import pypdfium2  # noqa: F401
        import pytesseract
    except ImportError:
        return None
    try:
        return tuple(lang for lang in pytesseract.get_languages(config="") if lang != "osd")
    except Exception:  # noqa: BLE001 - a broken install reads as no OCR, and the scan is named as such
        return None


def available() -> bool:
    return os.environ.get("FORJA_OCR", "auto").lower() != "off" and bool(_installed())


def languages() -> str:
    installed = _installed() or ()
    chosen = [lang for lang in PREFERRED if lang in installed] or list(installed[:1])
    return "+".join(chosen)


def read_pages(path: Path, numbers: list[int]) -> dict[int, str]:
    """The text Tesseract reads on the pages `numbers` (0-based) of the PDF at `path`."""
    import pypdfium2
    import pytesseract

    found: dict[int, str] = {}
    document = pypdfium2.PdfDocument(str(path))
    try:
        for number in numbers:
            image = document[number].render(scale=RENDER_DPI / 72).to_pil()
            found[number] = pytesseract.image_to_string(image, lang=languages()).strip()
    finally:
        document.close()
    return found
