"""Reading the output: SQL views over it, and the review loop (rows out to annotators, answers back)."""

from ..core.lazy import exports

__all__ = ["ExportConfig", "ExportResult", "ReviewError", "export_review", "import_reviews", "query"]
__getattr__, __dir__ = exports(__name__, {"query": ".views", "export_review": ".export", "ExportConfig": ".export",
                                          "ExportResult": ".export", "ReviewError": ".export",
                                          "import_reviews": ".ingest"})
