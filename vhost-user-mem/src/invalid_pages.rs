//! The invalid-page map: guest frames the guest handed to the balloon (inflated and not yet
//! deflated). Their content is meaningless, so a snapshot writer types them `Invalid` and
//! stores no data for them.
//!
//! The map is kept over absolute guest frame numbers (gfn = guest physical address / 4096), so
//! it survives a frontend reconnect that sends a new memory table. It is handed out in the two
//! shapes `ext-snapshot`'s writer takes as its invalid-page set: the words of a gfn bitmap
//! (`ext_snapshot::GfnBitmap::new(map.gfn_words())`) or one bitmap per region of the current
//! memory table (`ext_snapshot::RegionBitmaps`, from [`InvalidPages::region_bitmaps`]).
//!
//! Ranges the guest *reports* free are not recorded here: they are punched, so they read as
//! holes and type themselves as never-populated.

/// The map: ext-snapshot's set of guest frame numbers, which its writer also takes directly.
pub use ext_snapshot::GfnSet as InvalidPages;
