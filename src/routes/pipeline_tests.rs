//! Pipeline tests of routes: placeholder.
