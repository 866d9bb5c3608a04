"""Ground floor: finding and reading studies, writing outputs atomically."""
