//! The read-only filesystem that shows any moment of a repository (to be built).
