//! The dashboard's files, compiled into the binary: nothing is loaded from elsewhere.

pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const INDEX: Asset =
    Asset { content_type: "text/html; charset=utf-8", body: include_bytes!("assets/index.html") };
const SCRIPT: Asset =
    Asset { content_type: "text/javascript; charset=utf-8", body: include_bytes!("assets/app.js") };
const STYLE: Asset =
    Asset { content_type: "text/css; charset=utf-8", body: include_bytes!("assets/app.css") };
const ICON: Asset = Asset { content_type: "image/svg+xml", body: include_bytes!("assets/favicon.svg") };

/// The file at `path`. Every page is the one HTML file: the script draws the view its
/// address names, so addresses can be shared and reloaded.
pub fn find(path: &str) -> Option<&'static Asset> {
    match path {
        "/" | "/runs" | "/agents" | "/breakers" => Some(&INDEX),
        "/assets/app.js" => Some(&SCRIPT),
        "/assets/app.css" => Some(&STYLE),
        "/favicon.ico" | "/assets/favicon.svg" => Some(&ICON),
        p => p.strip_prefix("/runs/").filter(|id| !id.is_empty() && !id.contains('/')).map(|_| &INDEX),
    }
}
