// Offsets between the API and the browser. The API counts Python string indices, i.e. Unicode
// code points; JavaScript strings (and DOM selections) count UTF-16 code units, where every
// character above U+FFFF (emoji, many CJK extensions) takes two. Combining marks and
// right-to-left letters are one code point each in both, so only surrogate pairs differ.
"use strict";

(function (global) {
  // A two-way table for one text: code point index <-> UTF-16 index.
  class OffsetMap {
    constructor(text) {
      this.text = text;
      const toUnit = [0];         // toUnit[cp] = UTF-16 index where code point cp starts
      const toPoint = [0];        // toPoint[u] = code point index of UTF-16 index u
      let unit = 0;
      for (const ch of text) {    // iterates by code point (a lone surrogate is one step)
        unit += ch.length;
        if (ch.length === 2) toPoint.push(toUnit.length - 1);  // inside the pair: this code point
        toUnit.push(unit);
        toPoint.push(toUnit.length - 1);
      }
      this.toUnit = toUnit;
      this.toPoint = toPoint;
    }

    get length() { return this.toUnit.length - 1; }  // in code points, like Python's len()

    unit(point) {
      if (!Number.isInteger(point) || point < 0 || point > this.length) {
        throw new RangeError(`code point offset ${point} is outside the text of ${this.length} code points`);
      }
      return this.toUnit[point];
    }

    // A UTF-16 index inside a surrogate pair rounds down to the pair's start.
    point(unit) {
      if (!Number.isInteger(unit) || unit < 0 || unit > this.text.length) {
        throw new RangeError(`UTF-16 offset ${unit} is outside the text of ${this.text.length} units`);
      }
      return this.toPoint[unit];
    }

    // The text between two code point offsets: Python's text[start:end].
    slice(start, end) { return this.text.slice(this.unit(start), this.unit(end)); }
  }

  // Number of code points in a JavaScript string (Python's len()).
  function pointLength(s) {
    let n = 0;
    for (const _ of s) n += 1;  // eslint-disable-line no-unused-vars
    return n;
  }

  global.NerOffsets = { OffsetMap, pointLength };
})(window);
