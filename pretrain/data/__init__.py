"""Sample data bundled with the package: tiny Shakespeare (public domain), the quickstart corpus."""
