//! tracing setup: `TERN_LOG` filter, `TERN_LOG_FORMAT=plain|json`, logs on stderr.

use tracing_subscriber::EnvFilter;

use crate::cli::{LogArgs, LogFormat};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log (TERN_LOG) `{filter}` is not a valid filter: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    let filter = EnvFilter::builder()
        .parse(&args.filter)
        .map_err(|source| LogError::Filter {
            filter: args.filter.clone(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match args.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}
