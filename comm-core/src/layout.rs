//! Host layout operations (filled in by the layout work item).
