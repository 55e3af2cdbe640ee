fn main() {
    // Rust ignores SIGPIPE, so a closed reader (`sdlora inspect x | head`) would make println!
    // panic; the default action ends the process quietly, as Unix tools do
    #[cfg(unix)]
    // SAFETY: set before any thread starts; SIG_DFL is a valid handler for SIGPIPE
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle asks for its thread count on every CPU op and, unless RAYON_NUM_THREADS is set,
    // works it out by reading /proc/cpuinfo each time: measured at ~10 % of a training step.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // glibc hands every freed block over 32 MiB back to the kernel, so each full-size activation
    // came back as fresh zeroed pages: a 512 px LoRA step spent a third of its time in page
    // faults. Kept in the heap, the same blocks serve the next step (peak RSS +2 %).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: set before any thread starts; mallopt only changes allocator thresholds
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    let cli = sdlora::cli::parse();
    if let Err(e) = sdlora::cli::run(cli) {
        if let Some(s) = e.downcast_ref::<sdlora::util::stop::Stopped>() {
            eprintln!("{s}");
            std::process::exit(sdlora::util::stop::EXIT_CODE);
        }
        // one line, no backtrace: what went wrong, which file, what to do
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
