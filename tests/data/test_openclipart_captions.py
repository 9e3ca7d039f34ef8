from msclip_fast.data.openclipart import SvgText, build_caption, clean_text, filename_hint, parse_svg_text

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <metadata><rdf:RDF>
  <cc:Work rdf:about="">
   <dc:creator><cc:Agent><dc:title>Architetto Francesco Rollandin</dc:title></cc:Agent></dc:creator>
   <dc:title>Gelato all&amp;#39;italiana</dc:title>
   <dc:description>A chemistry flask with the &amp;quot;required&amp;quot;  bubbles.
     See http://example.org/x</dc:description>
   <dc:subject><rdf:Bag><rdf:li>unsorted</rdf:li><rdf:li></rdf:li><rdf:li>dessert</rdf:li>
     <rdf:li>hash</rdf:li><rdf:li>&amp;eacute;toile</rdf:li><rdf:li>123</rdf:li><rdf:li>gelato</rdf:li><rdf:li>Architetto Francesco Rollandin</rdf:li></rdf:Bag></dc:subject>
   <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
  </cc:Work>
 </rdf:RDF></metadata>
 <rect width="1" height="1"/>
</svg>"""

# Namespaces declared only on the root, agent listed first, no description, mojibake author.
SVG2 = """<svg xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><rdf:RDF><cc:Work rdf:about="">
 <dc:rights><cc:Agent><dc:title>Josu&amp;Atilde;&amp;copy; Alcalde</dc:title></cc:Agent></dc:rights>
 <dc:title>Croissant (B &amp;amp; W)</dc:title><dc:description>Croissant (B &amp;amp; W)</dc:description>
 </cc:Work></rdf:RDF></metadata></svg>"""


def test_title_from_work_not_author_and_entities_unescaped():
    t = parse_svg_text(SVG)
    assert t.title == "Gelato all'italiana"
    assert t.description.startswith('A chemistry flask with the "required" bubbles.')
    assert "étoile" in t.keywords
    cap = build_caption(t)
    assert cap == "Gelato all'italiana. A chemistry flask with the \"required\" bubbles. See. dessert, étoile"
    assert "Rollandin" not in cap and "Open Clip Art" not in cap and "http" not in cap


def test_root_namespaces_duplicate_description_and_mojibake():
    t = parse_svg_text(SVG2)
    assert t.title == "Croissant (B & W)"
    assert build_caption(t) == "Croissant (B & W)"  # description equal to title is not repeated
    assert clean_text("Josu&amp;Atilde;&amp;copy; Alcalde") == "Josué Alcalde"


def test_unusable_captions_and_malformed_xml():
    assert build_caption(SvgText(title="Untitled", keywords=["unsorted", ""])) == ""
    assert build_caption(SvgText(title="", keywords=["flag", "australia"])) == "flag, australia"
    # a title that is just the author's name says nothing about the picture
    assert build_caption(SvgText(title="Mirjam Meijer", keywords=["flower"], agents=["Mirjam Meijer"])) == "flower"
    broken = SVG.replace("</rdf:RDF>", "")  # not well-formed: regex fallback still finds the work
    t = parse_svg_text(broken)
    assert t.title == "Gelato all'italiana" and t.error == "xml_parse_error"
    assert parse_svg_text("<svg></svg>").error == "no_work_element"


def test_filename_hint():
    assert filename_hint("computer/icons/folder_binary_01.png") == "folder binary"
