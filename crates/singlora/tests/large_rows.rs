//! A row of several megabytes encodes with memory in proportion to `max_length`, not to the
//! row: the heap this process allocates while encoding is counted by its allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use singlora::data::{encode, Dataset, Example, LabelSet, Record};
use singlora::tokenize::{word_level_tokenizer, TokenizerStyle};

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap `f` holds at once beyond what was in use before it ran, and its result.
fn peak_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = IN_USE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    (PEAK.load(Ordering::SeqCst) - before, out)
}

fn dataset(example: Example) -> Dataset {
    Dataset {
        path: PathBuf::from("big.jsonl"),
        records: vec![Record { line: 1, example }],
        skipped: vec![],
    }
}

const MB: usize = 1 << 20;

/// The only test of this binary, so that no other thread allocates while it measures.
#[test]
fn a_row_of_megabytes_encodes_in_memory_bounded_by_max_length() {
    let words = ["good", "bad", "movie", "plot"];
    let big = "good movie with a plot ".repeat(4 * MB / 23);
    assert!(big.len() > 4 * MB - 64);

    let bert = word_level_tokenizer(&words, TokenizerStyle::Bert);
    let ds = dataset(Example::Classify {
        text: big.clone(),
        text_pair: Some(big.clone()),
        label: "pos".into(),
    });
    let labels = LabelSet {
        names: vec!["pos".into()],
    };
    let (peak, enc) = peak_during(|| encode(&bert, &ds, Some(&labels), 64, None).unwrap());
    assert_eq!(enc[0].ids.len(), 64);
    assert!(peak < 2 * MB, "classification held {peak} bytes at once");

    let llama = word_level_tokenizer(&words, TokenizerStyle::Llama);
    let ds = dataset(Example::Sft {
        prompt: big.clone(),
        completion: big,
    });
    let (peak, enc) = peak_during(|| encode(&llama, &ds, None, 64, Some(3)).unwrap());
    assert_eq!(enc[0].ids.len(), 64);
    assert!(peak < 2 * MB, "prompt/completion held {peak} bytes at once");
}
